//! Where status transitions go: the log always, a webhook when configured.

use async_trait::async_trait;
use sluice_core::{Error, Status, Transition};

/// Receives every status transition of the entities it is attached to.
#[async_trait]
pub trait AlertSink: Send + Sync {
    /// Delivers one transition. Failures are logged by the caller, never retried forever.
    async fn send(&self, transition: &Transition) -> Result<(), Error>;
}

/// Logs transitions with `tracing`: a warning when things get worse, info when they recover.
#[derive(Clone, Copy, Debug, Default)]
pub struct LogSink;

#[async_trait]
impl AlertSink for LogSink {
    async fn send(&self, t: &Transition) -> Result<(), Error> {
        if t.to > t.from && t.to != Status::Healthy {
            tracing::warn!(entity = %t.entity, from = %t.from, to = %t.to, reason = %t.reason, "status changed");
        } else {
            tracing::info!(entity = %t.entity, from = %t.from, to = %t.to, "status changed");
        }
        Ok(())
    }
}

/// POSTs each transition as JSON (the [`Transition`] fields) to a URL.
#[derive(Clone, Debug)]
pub struct WebhookSink {
    url: String,
    client: reqwest::Client,
}

impl WebhookSink {
    /// A sink posting to `url` (http or https), with a 10-second timeout per delivery.
    pub fn new(url: impl Into<String>) -> Result<Self, Error> {
        let client = reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(10))
            .build()
            .map_err(|e| Error::invalid(format!("cannot build the webhook client: {e}")))?;
        Ok(Self {
            url: url.into(),
            client,
        })
    }
}

#[async_trait]
impl AlertSink for WebhookSink {
    async fn send(&self, t: &Transition) -> Result<(), Error> {
        let response = self
            .client
            .post(&self.url)
            .json(t)
            .send()
            .await
            .map_err(|e| Error::unavailable(format!("webhook {}", self.url), e))?;
        if !response.status().is_success() {
            return Err(Error::Unavailable {
                what: format!("webhook {} answered {}", self.url, response.status()),
                source: None,
            });
        }
        Ok(())
    }
}
