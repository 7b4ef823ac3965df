//! Certificates for a cluster: a CA, the server's certificate, and client certificates.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

use crate::Error;

/// A certificate authority made at cluster start; it signs the server certificate and any
/// client certificate a test asks for.
pub struct Authority {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
}

/// A client certificate and its key, as files (key mode 0600, owned by the current user,
/// as libpq requires).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientCert {
    /// PEM certificate whose common name is the role name.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
}

impl Authority {
    /// A new CA (for test servers: PostgreSQL here, an SMTP sink in the alert tests).
    pub fn new() -> Result<Self, Error> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "sluice localpg test CA");
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate()?;
        let cert_pem = params.self_signed(&key)?.pem();
        Ok(Self {
            issuer: Issuer::new(params, key),
            cert_pem,
        })
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// A server certificate for `localhost` and `127.0.0.1`: (certificate PEM, key PEM).
    pub fn server(&self) -> Result<(String, String), Error> {
        let mut params =
            CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])?;
        params
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.sign(params)
    }

    /// A client certificate for `role`, written to `dir` as `<file_stem>.crt` / `.key`.
    pub(crate) fn client(
        &self,
        role: &str,
        dir: &Path,
        file_stem: &str,
    ) -> Result<ClientCert, Error> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, role);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let (cert_pem, key_pem) = self.sign(params)?;
        let cert = dir.join(format!("{file_stem}.crt"));
        let key = dir.join(format!("{file_stem}.key"));
        write_private(&cert, &cert_pem)?;
        write_private(&key, &key_pem)?;
        Ok(ClientCert { cert, key })
    }

    fn sign(&self, params: CertificateParams) -> Result<(String, String), Error> {
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok((cert.pem(), key.serialize_pem()))
    }
}

/// Writes a file readable only by its owner (mode 0600): keys, credentials.
pub fn write_private(path: &Path, contents: &str) -> Result<(), Error> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| Error::io(format!("creating {}", path.display()), e))?;
    file.write_all(contents.as_bytes())
        .map_err(|e| Error::io(format!("writing {}", path.display()), e))
}
