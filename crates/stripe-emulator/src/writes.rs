//! What Stripe checks on writes, as its API documents it: `Idempotency-Key` (the same key
//! with the same request replays the first answer; with another request it is an
//! `idempotency_error`), parameters Stripe sets itself refused as unknown, and an invalid
//! email refused with `email_invalid`.

use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value};

use crate::{Inner, StripeError, error};

/// Parameters no request may set (Stripe answers `parameter_unknown`); `id` only on create.
fn settable(name: &str, creating: bool) -> bool {
    !matches!(name, "object" | "created" | "livemode" | "deleted") && (creating || name != "id")
}

/// Refuses what Stripe refuses in `fields` for `resource`.
pub(crate) fn check(
    resource: &str,
    creating: bool,
    fields: &Map<String, Value>,
) -> Result<(), StripeError> {
    if let Some(name) = fields.keys().find(|k| !settable(k, creating)) {
        return Err(error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            Some("parameter_unknown"),
            format!("Received unknown parameter: {name}"),
        ));
    }
    if resource == "customers"
        && let Some(email) = fields.get("email").and_then(Value::as_str)
        && !email.is_empty()
        && !email.contains('@')
    {
        return Err(error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            Some("email_invalid"),
            format!("Invalid email address: {email}"),
        ));
    }
    Ok(())
}

/// Answers a write, once per `Idempotency-Key`: the first answer is kept and replayed for the
/// same request (`Idempotent-Replayed: true`), and another request with the key is refused.
pub(crate) fn once(
    inner: &mut Inner,
    headers: &HeaderMap,
    request: String,
    write: impl FnOnce(&mut Inner) -> Result<Value, StripeError>,
) -> Response {
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    if let Some(key) = &key
        && let Some((first, answer)) = inner.idempotency.get(key)
    {
        if *first != request {
            return error(
                StatusCode::BAD_REQUEST,
                "idempotency_error",
                None,
                format!("Keys for idempotent requests can only be used with the same parameters they were first used with. Try using a key other than '{key}' if you meant to execute a different request."),
            )
            .into_response();
        }
        let mut response = respond(answer.clone());
        response.headers_mut().insert(
            "idempotent-replayed",
            "true".parse().expect("a constant header"),
        );
        return response;
    }
    let answer = write(inner);
    if let Some(key) = key {
        inner.idempotency.insert(key, (request, answer.clone()));
    }
    respond(answer)
}

fn respond(answer: Result<Value, StripeError>) -> Response {
    match answer {
        Ok(value) => axum::Json(value).into_response(),
        Err(e) => e.into_response(),
    }
}
