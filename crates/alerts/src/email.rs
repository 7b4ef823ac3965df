//! Email alerts over SMTP (lettre), STARTTLS or TLS through rustls.

use std::time::Duration;

use async_trait::async_trait;
use lettre::message::Mailbox;
use lettre::message::header::ContentType;
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Certificate, Tls, TlsParameters};
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use secrecy::ExposeSecret;
use sluice_core::{EmailConfig, Error, SmtpSecurity};

use crate::{Alert, Channel};

/// Sends each alert as a plain-text email.
pub struct EmailChannel {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    from: Mailbox,
    to: Vec<Mailbox>,
    server: String,
}

impl std::fmt::Debug for EmailChannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmailChannel")
            .field("server", &self.server)
            .field("to", &self.to.len())
            .finish_non_exhaustive()
    }
}

fn setting(what: &str, e: impl std::fmt::Display) -> Error {
    Error::configuration(
        format!("[alerts.email] {what}: {e}"),
        "correct it in the [alerts.email] section (docs/running.md, Alerts)",
    )
}

impl EmailChannel {
    /// A channel for `config`; reads the password and the CA file now. The error names the
    /// setting that is wrong, never the password.
    pub fn new(config: &EmailConfig) -> Result<Self, Error> {
        let host = config.smtp_host.as_str();
        let port = config.smtp_port.unwrap_or(match config.security {
            SmtpSecurity::Starttls => 587,
            SmtpSecurity::Tls => 465,
            SmtpSecurity::None => 25,
        });
        let mut builder = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(host)
            .port(port)
            .timeout(Some(Duration::from_secs(20)));
        if config.security != SmtpSecurity::None {
            let mut tls = TlsParameters::builder(host.to_owned());
            if let Some(path) = &config.ca_file {
                let pem = std::fs::read(path)
                    .map_err(|e| setting(&format!("ca_file {}", path.display()), e))?;
                let certificate = Certificate::from_pem(&pem)
                    .map_err(|e| setting(&format!("ca_file {}", path.display()), e))?;
                tls = tls.add_root_certificate(certificate);
            }
            let tls = tls.build_rustls().map_err(|e| setting("TLS", e))?;
            builder = builder.tls(match config.security {
                SmtpSecurity::Tls => Tls::Wrapper(tls),
                _ => Tls::Required(tls),
            });
        }
        if let Some(user) = &config.username {
            let password = match &config.password {
                Some(source) => source.resolve()?,
                None => {
                    return Err(Error::configuration(
                        "[alerts.email] has a username but no password",
                        "add password = { env = \"SMTP_PASSWORD\" } (or { file = \"…\" })",
                    ));
                }
            };
            builder = builder.credentials(Credentials::new(
                user.clone(),
                password.expose_secret().to_owned(),
            ));
        }
        let from: Mailbox = config.from.parse().map_err(|e| setting("from", e))?;
        let to = config
            .to
            .iter()
            .map(|t| {
                t.parse::<Mailbox>()
                    .map_err(|e| setting(&format!("to {t:?}"), e))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            transport: builder.build(),
            from,
            to,
            server: format!("{host}:{port}"),
        })
    }
}

#[async_trait]
impl Channel for EmailChannel {
    fn describe(&self) -> String {
        format!("email through {}", self.server)
    }

    async fn deliver(&self, alert: &Alert) -> Result<(), Error> {
        let mut message = Message::builder()
            .from(self.from.clone())
            .subject(alert.summary())
            .header(ContentType::TEXT_PLAIN);
        for to in &self.to {
            message = message.to(to.clone());
        }
        let message = message
            .body(alert.text())
            .map_err(|e| Error::invalid(format!("cannot build the alert email: {e}")))?;
        self.transport
            .send(message)
            .await
            .map_err(|e| Error::unavailable(format!("SMTP server {}", self.server), e))?;
        Ok(())
    }
}
