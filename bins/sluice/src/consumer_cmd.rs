//! `sluice consumer pause|resume|restart-backfill NAME`, through the running server's API.

use std::process::ExitCode;

use serde_json::json;
use sluice_core::Error;

use crate::client::ApiArgs;

/// What to do with a consumer.
#[derive(clap::Subcommand, Debug)]
pub enum Action {
    /// Stop writing after the batch in flight; nothing is lost (resume carries on).
    Pause {
        /// The consumer's name.
        name: String,
        /// Why, shown in its status.
        #[arg(long)]
        reason: Option<String>,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Carry on from the consumer's checkpoint.
    Resume {
        /// The consumer's name.
        name: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Write every record again from the start of the stream (rows you deleted by hand come
    /// back).
    RestartBackfill {
        /// The consumer's name.
        name: String,
        #[command(flatten)]
        api: ApiArgs,
    },
}

pub async fn run(action: Action) -> Result<ExitCode, Error> {
    let (api, name, verb, body) = match &action {
        Action::Pause { name, reason, api } => (
            api,
            name,
            "pause",
            json!({ "reason": reason.clone().unwrap_or_else(|| "paused from the command line".into()) }),
        ),
        Action::Resume { name, api } => (api, name, "resume", json!({})),
        Action::RestartBackfill { name, api } => (api, name, "restart-backfill", json!({})),
    };
    let consumer = api
        .api()?
        .post(&format!("/v1/consumers/{name}/{verb}"), body)
        .await?;
    sayln!(
        "consumer {name}: {} ({})",
        consumer["health"]["status"].as_str().unwrap_or("?"),
        consumer["health"]["checks"]
            .as_array()
            .and_then(|c| c
                .iter()
                .find(|c| c["name"] == "control" || c["status"] != "healthy"))
            .and_then(|c| c["message"].as_str())
            .unwrap_or("done")
    );
    Ok(ExitCode::SUCCESS)
}
