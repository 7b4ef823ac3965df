//! HTTP to a provider's API: one client per credential, every request through its
//! [`Limiter`], a bounded number in flight, each with a timeout; answers classified.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde_json::Value;
use time::OffsetDateTime;
use tokio::sync::Semaphore;

use crate::limit::Limiter;

/// How a client talks to one API with one credential.
#[derive(Clone, Debug)]
pub struct ClientSettings {
    /// The API's base URL, without a trailing `/` (`https://api.stripe.com`).
    pub base_url: String,
    /// Requests per second allowed for this credential.
    pub rate_limit: f64,
    /// Requests in flight at once.
    pub concurrency: usize,
    /// How long one request may take.
    pub timeout: Duration,
    /// Headers sent with every request (an API version), never secrets.
    pub headers: Vec<(String, String)>,
}

/// Why a request did not give a usable answer. Messages never hold the credential.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ApiError {
    /// `401`: the credential is wrong, expired or revoked.
    Unauthorized(String),
    /// `403`: the credential may not do this (a restricted key without the permission).
    Forbidden(String),
    /// `404`, or a `400` whose code says an object named in the request does not exist (a
    /// cursor that has expired, an object deleted meanwhile).
    Missing(String),
    /// `429` more times in a row than the client waits out.
    RateLimited(String),
    /// Another `4xx`: the request itself is refused; sending it again will not help.
    Refused {
        /// The HTTP status.
        status: u16,
        /// What the API said.
        message: String,
        /// The API's own error code, when it gave one (`email_invalid`).
        code: Option<String>,
    },
    /// A `5xx`.
    Server {
        /// The HTTP status.
        status: u16,
        /// What the API said, if it said anything readable.
        message: String,
    },
    /// The request did not complete: connection refused or reset, a timeout.
    Transport(String),
    /// An answer that is not what the API documents (not JSON, a field missing, a list out of
    /// order). Nothing from it is used.
    Malformed(String),
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ApiError::Unauthorized(m) => write!(f, "the API key was refused (401): {m}"),
            ApiError::Forbidden(m) => write!(f, "permission denied (403): {m}"),
            ApiError::Missing(m) => write!(f, "not found: {m}"),
            ApiError::RateLimited(m) => write!(f, "rate limited (429) again and again: {m}"),
            ApiError::Refused {
                status, message, ..
            } => {
                write!(f, "the request was refused ({status}): {message}")
            }
            ApiError::Server { status, message } => {
                write!(f, "the API failed ({status}): {message}")
            }
            ApiError::Transport(m) => write!(f, "the API could not be reached: {m}"),
            ApiError::Malformed(m) => write!(f, "the API's answer is malformed: {m}"),
        }
    }
}

impl std::error::Error for ApiError {}

/// A successful answer.
#[derive(Clone, Debug, PartialEq)]
pub struct Answer {
    /// Its JSON body.
    pub body: Value,
    /// When the API says it answered (its `Date` header), if it said.
    pub date: Option<OffsetDateTime>,
}

/// One credential's connection to an API.
pub struct Client {
    http: reqwest::Client,
    base_url: String,
    key: SecretString,
    headers: Vec<(String, String)>,
    limiter: Limiter,
    in_flight: Semaphore,
    timeout: Duration,
    requests: AtomicU64,
    last_ok: Mutex<Option<OffsetDateTime>>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("base_url", &self.base_url)
            .field("limit", &self.limiter.describe())
            .finish_non_exhaustive()
    }
}

/// `429`s in a row the client waits out before giving the caller [`ApiError::RateLimited`].
const RATE_LIMITED_RETRIES: u32 = 20;

impl Client {
    /// A client sending `key` as a bearer token.
    pub fn new(settings: &ClientSettings, key: SecretString) -> Result<Self, ApiError> {
        let http = reqwest::Client::builder()
            .timeout(settings.timeout)
            .connect_timeout(settings.timeout.min(Duration::from_secs(10)))
            .user_agent(concat!("sluice/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| ApiError::Transport(format!("cannot build an HTTP client: {e}")))?;
        Ok(Self {
            http,
            base_url: settings.base_url.trim_end_matches('/').to_owned(),
            key,
            headers: settings.headers.clone(),
            limiter: Limiter::new(settings.rate_limit),
            in_flight: Semaphore::new(settings.concurrency.max(1)),
            timeout: settings.timeout,
            requests: AtomicU64::new(0),
            last_ok: Mutex::new(None),
        })
    }

    /// `GET {base}{path}?{query}` with `headers`, as JSON. Waits for the rate limit, and
    /// waits out `429`s as the API asks (`Retry-After`); every other failure is returned,
    /// classified, for the caller's retry policy.
    pub async fn get(
        &self,
        path: &str,
        query: &[(&str, String)],
        headers: &[(&str, &str)],
    ) -> Result<Value, ApiError> {
        self.send(reqwest::Method::GET, path, query, None, headers)
            .await
            .map(|answer| answer.body)
    }

    /// Like [`Client::get`], with any method and a form body (`application/x-www-form-urlencoded`),
    /// for writes; the answer also says when the API says it answered (its `Date` header).
    pub async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        query: &[(&str, String)],
        form: Option<&[(String, String)]>,
        headers: &[(&str, &str)],
    ) -> Result<Answer, ApiError> {
        let verb = method.as_str().to_owned();
        let mut throttled = 0;
        loop {
            let permit = self.in_flight.acquire().await;
            self.limiter.acquire().await;
            self.requests.fetch_add(1, Ordering::Relaxed);
            let mut request = self
                .http
                .request(method.clone(), format!("{}{path}", self.base_url))
                .query(query)
                .bearer_auth(self.key.expose_secret());
            if let Some(form) = form {
                request = request.form(form);
            }
            for (name, value) in &self.headers {
                request = request.header(name, value);
            }
            for (name, value) in headers {
                request = request.header(*name, *value);
            }
            let response = request.send().await;
            let response = match response {
                Ok(r) => r,
                Err(e) => return Err(self.transport(&verb, path, e)),
            };
            let status = response.status().as_u16();
            let retry_after = header_seconds(response.headers(), "retry-after");
            let date = response
                .headers()
                .get("date")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| {
                    OffsetDateTime::parse(v, &time::format_description::well_known::Rfc2822).ok()
                });
            let should_retry = response
                .headers()
                .get("stripe-should-retry")
                .and_then(|v| v.to_str().ok())
                .map(|v| v == "true");
            let body = match response.bytes().await {
                Ok(b) => b,
                Err(e) => return Err(self.transport(&verb, path, e)),
            };
            drop(permit);
            if (200..300).contains(&status) {
                let value: Value = serde_json::from_slice(&body).map_err(|e| {
                    ApiError::Malformed(format!(
                        "{verb} {path} answered {status} with a body that is not JSON ({e}): {}",
                        excerpt(&body)
                    ))
                })?;
                *self.last_ok.lock().unwrap_or_else(|e| e.into_inner()) =
                    Some(OffsetDateTime::now_utc());
                return Ok(Answer { body: value, date });
            }
            let (code, message) = error_text(&body);
            let message = self.redact(&format!("{verb} {path}: {message}"));
            if status == 429 {
                throttled += 1;
                if throttled > RATE_LIMITED_RETRIES || should_retry == Some(false) {
                    return Err(ApiError::RateLimited(message));
                }
                self.limiter
                    .pause(retry_after.unwrap_or(Duration::from_secs(1)));
                continue;
            }
            return Err(match status {
                401 => ApiError::Unauthorized(message),
                403 => ApiError::Forbidden(message),
                404 => ApiError::Missing(message),
                400 if code.as_deref() == Some("resource_missing") => ApiError::Missing(message),
                400..=499 => ApiError::Refused {
                    status,
                    message,
                    code,
                },
                _ => ApiError::Server { status, message },
            });
        }
    }

    fn transport(&self, verb: &str, path: &str, e: reqwest::Error) -> ApiError {
        let e = e.without_url();
        // reqwest's own text is terse ("error sending request"); the causes say what happened.
        let mut text = e.to_string();
        let mut cause = std::error::Error::source(&e);
        while let Some(c) = cause {
            text.push_str(&format!(": {c}"));
            cause = c.source();
        }
        let text = self.redact(&text);
        if e.is_timeout() {
            ApiError::Transport(format!(
                "{verb} {path} did not answer within {} s",
                self.timeout.as_secs_f64()
            ))
        } else if e.is_decode() || e.is_body() {
            ApiError::Malformed(format!("{verb} {path}: the body was cut off: {text}"))
        } else {
            ApiError::Transport(format!("{verb} {path} to {}: {text}", self.base_url))
        }
    }

    /// The message without the credential, should an API echo it, even in part: any word
    /// starting like the key (`sk_test_…`, `sk_test_****1234`) is replaced.
    fn redact(&self, message: &str) -> String {
        let key = self.key.expose_secret();
        let message = if key.len() >= 4 {
            message.replace(key, "[redacted]")
        } else {
            message.to_owned()
        };
        let Some(prefix) = key.get(..7).filter(|_| key.len() >= 12) else {
            return message;
        };
        let mut out = String::with_capacity(message.len());
        let mut rest = message.as_str();
        while let Some(at) = rest.find(prefix) {
            out.push_str(&rest[..at]);
            out.push_str("[redacted]");
            let tail = &rest[at..];
            let end = tail
                .find(|c: char| c.is_whitespace() || matches!(c, '"' | '\'' | ',' | ')'))
                .unwrap_or(tail.len());
            rest = &tail[end..];
        }
        out.push_str(rest);
        out
    }

    /// Requests sent since start (including answered `429`s).
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// When a request last succeeded.
    pub fn last_ok(&self) -> Option<OffsetDateTime> {
        *self.last_ok.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Time requests have waited for the rate limit or a `Retry-After`.
    pub fn rate_limit_wait(&self) -> Duration {
        self.limiter.waited()
    }

    /// The limit, for messages (`25 requests/s`).
    pub fn rate_limit(&self) -> String {
        self.limiter.describe()
    }
}

fn header_seconds(headers: &reqwest::header::HeaderMap, name: &str) -> Option<Duration> {
    let text = headers.get(name)?.to_str().ok()?;
    let seconds: f64 = text.trim().parse().ok()?;
    (seconds.is_finite() && seconds >= 0.0).then(|| Duration::from_secs_f64(seconds.min(600.0)))
}

/// The error code and message of an API's error body, in the shapes APIs use
/// (`{"error": {"code", "message"}}`, `{"message", "category"}`, `[{"message", "errorCode"}]`),
/// else an excerpt of the body.
fn error_text(body: &[u8]) -> (Option<String>, String) {
    let Ok(value) = serde_json::from_slice::<Value>(body) else {
        return (None, format!("(not JSON) {}", excerpt(body)));
    };
    let inner = match &value {
        Value::Array(items) => items.first().cloned().unwrap_or(Value::Null),
        Value::Object(o) => o
            .get("error")
            .filter(|e| e.is_object())
            .cloned()
            .unwrap_or(value.clone()),
        _ => Value::Null,
    };
    let text = |k: &str| inner.get(k).and_then(Value::as_str).map(str::to_owned);
    let code = text("code")
        .or_else(|| text("errorCode"))
        .or_else(|| text("category"));
    let message = text("message").unwrap_or_else(|| excerpt(body));
    (code, message)
}

/// At most 200 characters of a body, for messages.
fn excerpt(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let mut cut: String = text.chars().take(200).collect();
    if text.chars().count() > 200 {
        cut.push('…');
    }
    if cut.is_empty() {
        "(empty body)".to_owned()
    } else {
        cut
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_bodies_of_every_common_shape_give_code_and_message() {
        assert_eq!(
            error_text(br#"{"error": {"type": "invalid_request_error", "code": "resource_missing", "message": "No such event: 'evt_1'"}}"#),
            (Some("resource_missing".into()), "No such event: 'evt_1'".into())
        );
        assert_eq!(
            error_text(br#"[{"message": "Session expired", "errorCode": "INVALID_SESSION_ID"}]"#),
            (Some("INVALID_SESSION_ID".into()), "Session expired".into())
        );
        assert_eq!(
            error_text(b"<html>bad gateway</html>").1,
            "(not JSON) <html>bad gateway</html>"
        );
        assert_eq!(error_text(b"").1, "(not JSON) (empty body)");
    }
}
