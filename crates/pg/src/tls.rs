//! TLS for connections sluice makes without sqlx (the replication connection): the same
//! `sslmode` rules sqlx applies to every other connection, in one place beside them.
//!
//! | sslmode | asks for TLS | plain text if refused | checks the chain | checks the host name |
//! |---|---|---|---|---|
//! | `disable` | no | - | - | - |
//! | `prefer` | yes | yes | no | no |
//! | `require` | yes | no | no | no |
//! | `verify-ca` | yes | no | yes | no |
//! | `verify-full` | yes | no | yes | yes |

use std::sync::Arc;

use sluice_core::{Error, SslMode};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::rustls;

use crate::settings::{ConnectionSettings, ssl_mode_name};

/// A connection's byte stream, plain or encrypted.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

fn lost(what: &str, e: std::io::Error) -> Error {
    Error::unavailable(format!("connection: {what}"), e)
}

/// Asks the server on `tcp` for TLS as `settings`' sslmode says (PostgreSQL's SSLRequest),
/// and returns the stream to speak the protocol on.
pub async fn negotiate_tls(
    tcp: TcpStream,
    settings: &ConnectionSettings,
) -> Result<Box<dyn Io>, Error> {
    Ok(negotiate(tcp, settings).await?.0)
}

/// Like [`negotiate_tls`], and says whether the stream is encrypted (`prefer` may fall back to
/// plain text).
pub async fn negotiate(
    mut tcp: TcpStream,
    settings: &ConnectionSettings,
) -> Result<(Box<dyn Io>, bool), Error> {
    if settings.ssl_mode == SslMode::Disable {
        return Ok((Box::new(tcp), false));
    }
    // SSLRequest.
    tcp.write_all(&[0, 0, 0, 8, 4, 210, 22, 47])
        .await
        .map_err(|e| lost("requesting TLS", e))?;
    let answer = tcp.read_u8().await.map_err(|e| lost("requesting TLS", e))?;
    if answer != b'S' {
        if settings.ssl_mode == SslMode::Prefer {
            return Ok((Box::new(tcp), false));
        }
        return Err(Error::configuration(
            format!(
                "sslmode={} but {} does not accept TLS connections",
                ssl_mode_name(settings.ssl_mode),
                settings.endpoint()
            ),
            "enable ssl on the server (ssl = on with a certificate), or lower sslmode if the network is trusted",
        ));
    }
    let config = tls_config(settings)?;
    let name = rustls::pki_types::ServerName::try_from(settings.host.clone()).map_err(|_| {
        Error::configuration(
            format!("{:?} is not a valid TLS server name", settings.host),
            "use a host name or IP address",
        )
    })?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .map_err(|e| {
            Error::configuration(
                format!("TLS handshake with {} failed: {e}", settings.endpoint()),
                "check sslmode and the root certificate (root_cert) for this source",
            )
        })?;
    Ok((Box::new(tls), true))
}

/// The TLS acceptor for one of sluice's own servers (`section` names its config, e.g.
/// `[api] tls`, in errors): the certificate chain and key from PEM files, rustls with ring,
/// offering `alpn` when not empty. The error names the file and what is wrong with it.
pub fn acceptor(
    section: &str,
    certificate_file: &std::path::Path,
    key_file: &std::path::Path,
    alpn: &[&[u8]],
) -> Result<tokio_rustls::TlsAcceptor, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certificate = certificate_file.display();
    let certs = CertificateDer::pem_file_iter(certificate_file)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{section} certificate_file {certificate}: {e}"))?;
    if certs.is_empty() {
        return Err(format!(
            "{section} certificate_file {certificate} holds no PEM certificate"
        ));
    }
    let key = PrivateKeyDer::from_pem_file(key_file)
        .map_err(|e| format!("{section} key_file {}: {e}", key_file.display()))?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .map_err(|e| format!("{section}: the certificate and key do not work together: {e}"))?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

fn tls_config(settings: &ConnectionSettings) -> Result<rustls::ClientConfig, Error> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::invalid(format!("TLS setup: {e}")))?;
    let pem_error = |what: &str, path: &std::path::Path, e: rustls::pki_types::pem::Error| {
        Error::configuration(
            format!("cannot read the {what} {}: {e}", path.display()),
            format!("point the source's {what} at a readable PEM file"),
        )
    };
    let builder = match settings.ssl_mode {
        SslMode::VerifyCa | SslMode::VerifyFull => {
            let mut roots = rustls::RootCertStore::empty();
            match &settings.root_cert {
                Some(path) => {
                    for cert in CertificateDer::pem_file_iter(path)
                        .map_err(|e| pem_error("root certificate", path, e))?
                    {
                        let cert = cert.map_err(|e| pem_error("root certificate", path, e))?;
                        roots.add(cert).map_err(|e| {
                            Error::configuration(
                                format!("bad root certificate {}: {e}", path.display()),
                                "use the CA certificate that signed the server's certificate",
                            )
                        })?;
                    }
                }
                None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
            }
            let webpki = rustls::client::WebPkiServerVerifier::builder_with_provider(
                Arc::new(roots),
                provider.clone(),
            )
            .build()
            .map_err(|e| Error::invalid(format!("TLS setup: {e}")))?;
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(Verifier {
                    webpki: Some(webpki),
                    check_name: settings.ssl_mode == SslMode::VerifyFull,
                    provider,
                }))
        }
        _ => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Verifier {
                webpki: None,
                check_name: false,
                provider,
            })),
    };
    match (&settings.client_cert, &settings.client_key) {
        (Some(cert), Some(key)) => {
            let chain = CertificateDer::pem_file_iter(cert)
                .map_err(|e| pem_error("client certificate", cert, e))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| pem_error("client certificate", cert, e))?;
            let key =
                PrivateKeyDer::from_pem_file(key).map_err(|e| pem_error("client key", key, e))?;
            builder.with_client_auth_cert(chain, key).map_err(|e| {
                Error::configuration(
                    format!("the client certificate and key do not work together: {e}"),
                    "use the key that belongs to the client certificate",
                )
            })
        }
        _ => Ok(builder.with_no_client_auth()),
    }
}

/// `require`/`prefer`: encrypt without verifying (as libpq does); `verify-ca`: the chain only;
/// `verify-full`: the chain and the host name.
#[derive(Debug)]
struct Verifier {
    webpki: Option<Arc<rustls::client::WebPkiServerVerifier>>,
    check_name: bool,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl rustls::client::danger::ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        intermediates: &[rustls::pki_types::CertificateDer<'_>],
        server_name: &rustls::pki_types::ServerName<'_>,
        ocsp: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let Some(webpki) = &self.webpki else {
            return Ok(rustls::client::danger::ServerCertVerified::assertion());
        };
        match webpki.verify_server_cert(end_entity, intermediates, server_name, ocsp, now) {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForName
                | rustls::CertificateError::NotValidForNameContext { .. },
            )) if !self.check_name => Ok(rustls::client::danger::ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
