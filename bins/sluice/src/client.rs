//! Talking to a running `sluice serve` from the command line (`status`, `consumer …`): where
//! its API is and its token, from flags, the environment, or the config the server runs with.

use secrecy::{ExposeSecret, SecretString};
use serde_json::Value;
use sluice_core::Error;

use crate::config_file::ConfigFile;

/// Where the API is and how to authenticate.
#[derive(clap::Args, Debug)]
pub struct ApiArgs {
    /// The server's API [default: the config's [api] listen, else http://127.0.0.1:7780]
    #[arg(long, env = "SLUICE_API_URL")]
    api: Option<String>,
    /// The API's bearer token [default: the config's [api] token]
    #[arg(long, env = "SLUICE_API_TOKEN", hide_env_values = true)]
    token: Option<SecretString>,
    #[command(flatten)]
    config: ConfigFile,
}

/// A client of one server's API.
pub struct Api {
    base: String,
    token: SecretString,
    http: reqwest::Client,
}

impl ApiArgs {
    /// The API to talk to. The config is read only for what the flags leave out; a config
    /// file that exists but cannot be used is an error (located in the file), not ignored.
    pub fn api(&self) -> Result<Api, Error> {
        let config = match (&self.api, &self.token) {
            (Some(_), Some(_)) => None,
            _ => match self.config.path() {
                Err(_) => None, // no config file anywhere: the flags and defaults alone
                Ok(_) => Some(self.config.load()?.1),
            },
        };
        let base = match (&self.api, &config) {
            (Some(api), _) => api.clone(),
            (None, Some(config)) if config.api.tls.is_some() => {
                // Certificates name a host: loopback is reached as localhost.
                let listen = config
                    .api
                    .listen
                    .replace("0.0.0.0:", "localhost:")
                    .replace("127.0.0.1:", "localhost:");
                format!("https://{listen}")
            }
            (None, Some(config)) => {
                let listen = config.api.listen.replace("0.0.0.0:", "127.0.0.1:");
                format!("http://{listen}")
            }
            (None, None) => "http://127.0.0.1:7780".to_owned(),
        };
        let token = match (&self.token, &config) {
            (Some(token), _) => token.clone(),
            (None, Some(config)) => config.api.token.resolve()?,
            (None, None) => {
                return Err(Error::configuration(
                    "no API token",
                    "set SLUICE_API_TOKEN (or --token) to the server's [api] token, or point --config at the server's sluice.toml",
                ));
            }
        };
        // The server's own certificate file is trusted too (a self-signed or private one).
        let mut http = reqwest::Client::builder();
        if let Some(tls) = config.as_ref().and_then(|c| c.api.tls.as_ref()) {
            let pem = std::fs::read(&tls.certificate_file).map_err(|e| {
                Error::configuration(
                    format!("cannot read [api] tls certificate_file {}: {e}", tls.certificate_file.display()),
                    "run the command where the server's certificate file is readable, or pass --api",
                )
            })?;
            for cert in reqwest::Certificate::from_pem_bundle(&pem).unwrap_or_default() {
                http = http.add_root_certificate(cert);
            }
        }
        let http = http
            .build()
            .map_err(|e| Error::invalid(format!("cannot build the HTTP client: {e}")))?;
        Ok(Api {
            base: base.trim_end_matches('/').to_owned(),
            token,
            http,
        })
    }
}

impl Api {
    /// `GET path`, as JSON.
    pub async fn get(&self, path: &str) -> Result<Value, Error> {
        self.send(self.http.get(format!("{}{path}", self.base)))
            .await
    }

    /// `POST path` with a JSON body, as JSON.
    pub async fn post(&self, path: &str, body: Value) -> Result<Value, Error> {
        self.send(self.http.post(format!("{}{path}", self.base)).json(&body))
            .await
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> Result<Value, Error> {
        let response = request
            .bearer_auth(self.token.expose_secret())
            .send()
            .await
            .map_err(|e| {
                Error::configuration(
                    format!("cannot reach the sluice API at {}: {e}", self.base),
                    "start `sluice serve`, or point --api / SLUICE_API_URL (or --config) at it",
                )
            })?;
        let status = response.status();
        if status == reqwest::StatusCode::UNAUTHORIZED {
            return Err(Error::configuration(
                "the API refused the token",
                "set SLUICE_API_TOKEN (or --token) to the server's [api] token",
            ));
        }
        let body: Value = response
            .json()
            .await
            .map_err(|e| Error::invalid(format!("the API's answer is not JSON: {e}")))?;
        if !status.is_success() {
            let why = body["error"]
                .as_str()
                .unwrap_or("no reason given")
                .to_owned();
            return Err(Error::invalid(format!("the API answered {status}: {why}")));
        }
        Ok(body)
    }
}
