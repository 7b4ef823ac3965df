//! Opening an authenticated SSH client session with a pinned host key: shared by the bastion
//! tunnel and the reverse-tunnel agent.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use russh::client::{self, Handle};
use russh::keys::{PrivateKeyWithHashAlg, PublicKeyOrCertificate};

use crate::TunnelError;
use crate::keys::{fingerprint, load};

/// The fingerprint a server must present, and the one it did present (for the error).
#[derive(Clone, Debug)]
pub(crate) struct HostKeyPin {
    expected: Option<String>,
    seen: Arc<Mutex<Option<String>>>,
}

impl HostKeyPin {
    pub(crate) fn new(expected: Option<String>) -> Self {
        Self {
            expected,
            seen: Arc::new(Mutex::new(None)),
        }
    }

    /// For `client::Handler::check_server_key`: true only for the pinned key.
    pub(crate) fn accepts(&self, key: &PublicKeyOrCertificate) -> bool {
        let PublicKeyOrCertificate::PublicKey { key, .. } = key else {
            return false;
        };
        let got = fingerprint(key);
        let ok = self.expected.as_deref() == Some(got.as_str());
        *self.seen.lock().unwrap_or_else(|p| p.into_inner()) = Some(got);
        ok
    }

    fn refusal(&self, endpoint: String) -> TunnelError {
        let got = self
            .seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .unwrap_or_default();
        match &self.expected {
            None => TunnelError::HostKeyNotPinned {
                bastion: endpoint,
                fingerprint: got,
            },
            Some(expected) => TunnelError::HostKeyChanged {
                bastion: endpoint,
                expected: expected.clone(),
                got,
            },
        }
    }
}

/// Where and as whom to log in.
pub(crate) struct Login<'a> {
    pub host: &'a str,
    pub port: u16,
    pub user: &'a str,
    pub key_file: &'a Path,
    pub keepalive: Duration,
    pub keepalive_max: usize,
    pub timeout: Duration,
}

/// Connects (within the timeout), checks the host key through `pin` (which `handler` must
/// consult), and authenticates with the key; every failure is explained.
pub(crate) async fn open<H>(
    login: &Login<'_>,
    pin: &HostKeyPin,
    handler: H,
) -> Result<Handle<H>, TunnelError>
where
    H: client::Handler<Error = russh::Error> + Send + 'static,
{
    let key = load(login.key_file)?;
    let ssh = Arc::new(client::Config {
        keepalive_interval: Some(login.keepalive),
        keepalive_max: login.keepalive_max,
        nodelay: true,
        ..Default::default()
    });
    let endpoint = format!("{}:{}", login.host, login.port);
    let connect = client::connect(ssh, (login.host, login.port), handler);
    let mut session = match tokio::time::timeout(login.timeout, connect).await {
        Err(_) => {
            let detail = format!("no answer within {}s", login.timeout.as_secs());
            return Err(TunnelError::BastionUnreachable {
                bastion: endpoint,
                detail,
            });
        }
        Ok(Err(russh::Error::UnknownKey)) => return Err(pin.refusal(endpoint)),
        Ok(Err(russh::Error::IO(e))) => {
            return Err(TunnelError::BastionUnreachable {
                bastion: endpoint,
                detail: e.to_string(),
            });
        }
        Ok(Err(e)) => return Err(TunnelError::Ssh(e.to_string())),
        Ok(Ok(session)) => session,
    };
    let hash = session
        .best_supported_rsa_hash()
        .await
        .map_err(|e| TunnelError::Ssh(e.to_string()))?
        .flatten();
    let key_fingerprint = fingerprint(key.public_key());
    let auth = session
        .authenticate_publickey(login.user, PrivateKeyWithHashAlg::new(Arc::new(key), hash))
        .await
        .map_err(|e| TunnelError::Ssh(e.to_string()))?;
    if !auth.success() {
        return Err(TunnelError::AuthRejected {
            bastion: endpoint,
            user: login.user.to_owned(),
            key_fingerprint,
        });
    }
    Ok(session)
}
