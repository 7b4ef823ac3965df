//! SCRAM-SHA-256 authentication for the replication connection (sqlx does it for every
//! other connection).

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use secrecy::ExposeSecret;
use sluice_core::Error;

/// SCRAM-SHA-256 without channel binding (RFC 5802, RFC 7677).
pub(super) struct Scram {
    password: secrecy::SecretString,
    nonce: String,
    client_first_bare: String,
    server_signature: Option<Vec<u8>>,
}

impl Scram {
    pub(super) fn new(password: &str) -> Self {
        let mut raw = [0u8; 18];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut raw)
            .expect("the system random source works");
        let nonce = B64.encode(raw);
        Self {
            password: password.into(),
            client_first_bare: format!("n=,r={nonce}"),
            nonce,
            server_signature: None,
        }
    }

    pub(super) fn client_first(&self) -> String {
        format!("n,,{}", self.client_first_bare)
    }

    pub(super) fn client_final(&mut self, server_first: &[u8]) -> Result<String, Error> {
        let bad =
            || Error::invalid("replication connection: malformed SCRAM message from the server");
        let server_first = std::str::from_utf8(server_first).map_err(|_| bad())?;
        let mut nonce = None;
        let mut salt = None;
        let mut iterations = None;
        for part in server_first.split(',') {
            match part.split_at_checked(2) {
                Some(("r=", v)) => nonce = Some(v),
                Some(("s=", v)) => salt = Some(B64.decode(v).map_err(|_| bad())?),
                Some(("i=", v)) => iterations = Some(v.parse::<u32>().map_err(|_| bad())?),
                _ => {}
            }
        }
        let (nonce, salt, iterations) = (
            nonce.ok_or_else(bad)?,
            salt.ok_or_else(bad)?,
            iterations.ok_or_else(bad)?,
        );
        if !nonce.starts_with(&self.nonce) {
            return Err(bad());
        }
        let mut salted = [0u8; 32];
        ring::pbkdf2::derive(
            ring::pbkdf2::PBKDF2_HMAC_SHA256,
            std::num::NonZeroU32::new(iterations).ok_or_else(bad)?,
            &salt,
            self.password.expose_secret().as_bytes(),
            &mut salted,
        );
        let hmac = |key: &[u8], data: &[u8]| {
            ring::hmac::sign(&ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key), data)
                .as_ref()
                .to_vec()
        };
        let client_key = hmac(&salted, b"Client Key");
        let stored_key = ring::digest::digest(&ring::digest::SHA256, &client_key);
        let without_proof = format!("c=biws,r={nonce}");
        let auth_message = format!("{},{server_first},{without_proof}", self.client_first_bare);
        let signature = hmac(stored_key.as_ref(), auth_message.as_bytes());
        let proof: Vec<u8> = client_key
            .iter()
            .zip(&signature)
            .map(|(a, b)| a ^ b)
            .collect();
        let server_key = hmac(&salted, b"Server Key");
        self.server_signature = Some(hmac(&server_key, auth_message.as_bytes()));
        Ok(format!("{without_proof},p={}", B64.encode(proof)))
    }

    pub(super) fn verify_server(&self, server_final: &[u8]) -> Result<(), Error> {
        let expected = self.server_signature.as_deref().unwrap_or_default();
        let text = std::str::from_utf8(server_final).unwrap_or_default();
        match text.strip_prefix("v=").map(|v| B64.decode(v)) {
            Some(Ok(v)) if v == expected => Ok(()),
            _ => Err(Error::configuration(
                "the server's SCRAM signature does not match: it does not know the password, or something is in the middle",
                "check that the source address points at the intended server",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scram_matches_the_rfc_7677_example() {
        // RFC 7677 section 3, with the client nonce fixed.
        let mut s = Scram::new("pencil");
        s.nonce = "rOprNGfwEbeRWgbNEkqO".into();
        s.client_first_bare = "n=user,r=rOprNGfwEbeRWgbNEkqO".into();
        let last = s
            .client_final(b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096")
            .unwrap();
        assert_eq!(
            last,
            "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
        );
        s.verify_server(b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=")
            .unwrap();
        assert!(s.verify_server(b"v=AAAA").is_err());
    }

    #[test]
    fn a_nonce_the_client_did_not_start_is_refused() {
        let mut s = Scram::new("pw");
        assert!(s.client_final(b"r=other,s=QUJD,i=4096").is_err());
    }
}
