//! Where alerts go (`[alerts]`), part of the configuration types ([`crate::Config`]).

use std::path::PathBuf;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::SecretSource;

/// Where alerts are sent, besides the log (which always gets them). An alert fires when an
/// entity (a target, sync or consumer, or a rejected config reload) turns `warning` or
/// `error`, names the entity, the reason and the fix, is sent once per change of status, and
/// is followed by a recovery notice when the entity is healthy again.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AlertsConfig {
    /// URLs each alert is POSTed to as JSON (`[[alerts.webhook]]`).
    #[serde(default, rename = "webhook")]
    pub webhooks: Vec<WebhookConfig>,
    /// Email over SMTP (`[alerts.email]`).
    #[serde(default)]
    pub email: Option<EmailConfig>,
}

/// A webhook alerts are POSTed to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// The URL (`https://…`); a 2xx answer means delivered.
    pub url: String,
}

/// How the SMTP connection is secured.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum SmtpSecurity {
    /// Plain connection upgraded with STARTTLS, which the server must offer (port 587).
    #[default]
    Starttls,
    /// TLS from the first byte (port 465).
    Tls,
    /// No encryption: only for a relay on the same host or in tests. Credentials are refused.
    None,
}

/// Email alerts over SMTP.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EmailConfig {
    /// The SMTP server's host name (also the name its certificate must carry).
    pub smtp_host: String,
    /// Its port (default: 587 for `starttls`, 465 for `tls`, 25 for `none`).
    #[serde(default)]
    pub smtp_port: Option<u16>,
    /// `starttls` (default), `tls` or `none`.
    #[serde(default)]
    pub security: SmtpSecurity,
    /// A CA certificate (PEM) to trust besides the public roots, for a server with a private
    /// certificate.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// The SMTP user, when the server wants one.
    #[serde(default)]
    pub username: Option<String>,
    /// Where to read the SMTP password (`{ env = "…" }` or `{ file = "…" }`).
    #[serde(default)]
    pub password: Option<SecretSource>,
    /// The sender address (`sluice <sluice@example.com>`).
    pub from: String,
    /// The recipients.
    pub to: Vec<String>,
}
