//! `sluice status`: every entity's health from a running server, as a table.

use std::process::ExitCode;

use secrecy::{ExposeSecret, SecretString};
use sluice_core::{Error, HealthReport, Status};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The server's API.
    #[arg(long, env = "SLUICE_API_URL", default_value = "http://127.0.0.1:7780")]
    api: String,
    /// The API's bearer token.
    #[arg(long, env = "SLUICE_API_TOKEN", hide_env_values = true)]
    token: SecretString,
    /// Print the server's JSON instead of a table.
    #[arg(long)]
    json: bool,
}

pub async fn run(args: Args) -> Result<ExitCode, Error> {
    let url = format!("{}/v1/status", args.api.trim_end_matches('/'));
    let response = reqwest::Client::new()
        .get(&url)
        .bearer_auth(args.token.expose_secret())
        .send()
        .await
        .map_err(|e| {
            Error::configuration(
                format!("cannot reach the sluice API at {}: {e}", args.api),
                "start `sluice serve`, or point --api / SLUICE_API_URL at it",
            )
        })?;
    if response.status() == reqwest::StatusCode::UNAUTHORIZED {
        return Err(Error::configuration(
            "the API refused the token",
            "set SLUICE_API_TOKEN (or --token) to the server's [api] token",
        ));
    }
    let body: serde_json::Value = response
        .json()
        .await
        .map_err(|e| Error::invalid(format!("the API's answer is not JSON: {e}")))?;
    let reports: Vec<HealthReport> = serde_json::from_value(body["entities"].clone())
        .map_err(|e| Error::invalid(format!("unexpected status document: {e}")))?;
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&body).unwrap_or_default()
        );
    } else {
        print!("{}", table(&reports));
    }
    let healthy = reports
        .iter()
        .all(|r| matches!(r.status, Status::Healthy | Status::Initializing));
    Ok(if healthy {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// `KIND NAME STATUS REASON`, the reason being the worst check's message (and fix).
pub fn table(reports: &[HealthReport]) -> String {
    let mut rows = vec![(
        "KIND".to_owned(),
        "NAME".to_owned(),
        "STATUS".to_owned(),
        "REASON".to_owned(),
    )];
    for r in reports {
        let reason = match r.problems().first() {
            Some(c) => match &c.fix {
                Some(fix) => format!("{}: {} (fix: {fix})", c.name, c.message),
                None => format!("{}: {}", c.name, c.message),
            },
            None => String::new(),
        };
        rows.push((
            format!("{:?}", r.entity.kind).to_lowercase(),
            r.entity.name.clone(),
            r.status.to_string(),
            reason,
        ));
    }
    let w0 = rows.iter().map(|r| r.0.len()).max().unwrap_or(0);
    let w1 = rows.iter().map(|r| r.1.chars().count()).max().unwrap_or(0);
    let w2 = rows.iter().map(|r| r.2.len()).max().unwrap_or(0);
    rows.iter()
        .map(|(a, b, c, d)| {
            format!("{a:<w0$}  {b:<w1$}  {c:<w2$}  {d}")
                .trim_end()
                .to_owned()
                + "\n"
        })
        .collect()
}
