//! `sluice status`: every entity's health from a running server, as a table.

use std::process::ExitCode;

use sluice_core::{Error, HealthReport, Status};

use crate::client::ApiArgs;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    api: ApiArgs,
    /// Print the server's JSON instead of a table.
    #[arg(long)]
    json: bool,
}

pub async fn run(args: Args) -> Result<ExitCode, Error> {
    let body = args.api.api()?.get("/v1/status").await?;
    let reports: Vec<HealthReport> = serde_json::from_value(body["entities"].clone())
        .map_err(|e| Error::invalid(format!("unexpected status document: {e}")))?;
    if args.json {
        sayln!(
            "{}",
            serde_json::to_string_pretty(&body).unwrap_or_default()
        );
    } else {
        say!("{}", table(&reports));
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

/// `KIND NAME STATUS REASON` (the reason being the worst check's message and fix), each
/// entity followed by every one of its checks.
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
    let mut out = String::new();
    for (i, (a, b, c, d)) in rows.iter().enumerate() {
        out.push_str(format!("{a:<w0$}  {b:<w1$}  {c:<w2$}  {d}").trim_end());
        out.push('\n');
        let Some(report) = i.checked_sub(1).and_then(|i| reports.get(i)) else {
            continue;
        };
        for check in &report.checks {
            out.push_str(&format!(
                "    {:<12} {}: {}\n",
                check.status.to_string(),
                check.name,
                check.message
            ));
        }
    }
    out
}
