//! Writes to Stripe for the write-back proxy: `POST /v1/<objects>` to create,
//! `POST /v1/<objects>/<id>` to update, `DELETE /v1/<objects>/<id>` to delete, each with an
//! `Idempotency-Key`. Column values become Stripe's form parameters: objects as
//! `metadata[plan]=pro`, arrays as `items[0]=…`, `NULL` as an empty value (which unsets a
//! field), timestamps as Unix seconds.

use async_trait::async_trait;
use serde_json::Value;
use sluice_core::{CollectionId, Column, Columns, UpstreamChange};
use sluice_source_api::{ApiError, ApiWrites, Applied, Client, Method};
use time::OffsetDateTime;

use crate::OBJECTS;

/// Stripe's writes.
pub(crate) struct StripeWrites;

/// Fields Stripe sets itself on every object.
const ALWAYS_READ_ONLY: [&str; 5] = ["object", "created", "livemode", "deleted", "payload"];

/// `/v1/customers` for `stripe:customer`.
fn list_path(collection: &CollectionId) -> Option<&'static str> {
    let object = collection.0.strip_prefix("stripe:")?;
    OBJECTS
        .iter()
        .find(|(o, ..)| *o == object)
        .map(|(_, path, _)| *path)
}

/// PostgreSQL's `timestamptz` text (`2026-12-03 21:40:18+00`, `… 21:40:18.5+05:30`) as Unix
/// seconds.
fn unix_seconds(text: &str) -> Option<i64> {
    let mut iso = text.replacen(' ', "T", 1);
    // PostgreSQL prints a whole-hour offset as `+00`; RFC 3339 wants `+00:00`.
    if let Some(at) = iso.rfind(['+', '-'])
        && at > 10
        && iso.len() - at == 3
    {
        iso.push_str(":00");
    }
    OffsetDateTime::parse(&iso, &time::format_description::well_known::Rfc3339)
        .ok()
        .map(OffsetDateTime::unix_timestamp)
}

fn flatten(name: String, value: &Value, out: &mut Vec<(String, String)>) {
    match value {
        Value::Null => out.push((name, String::new())),
        Value::Bool(b) => out.push((name, b.to_string())),
        Value::Number(n) => out.push((name, n.to_string())),
        Value::String(s) => out.push((name, s.clone())),
        Value::Object(map) if map.is_empty() => out.push((name, String::new())),
        Value::Object(map) => {
            for (k, v) in map {
                flatten(format!("{name}[{k}]"), v, out);
            }
        }
        Value::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                flatten(format!("{name}[{i}]"), v, out);
            }
        }
    }
}

/// The form parameters for `values`.
pub(crate) fn form(values: &Columns) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for (name, column) in values {
        let Column { text, sql_type } = column;
        if sql_type.starts_with("timestamp")
            && let Some(seconds) = text.as_deref().and_then(unix_seconds)
        {
            out.push((name.clone(), seconds.to_string()));
            continue;
        }
        flatten(name.clone(), &column.to_json(), &mut out);
    }
    out
}

#[async_trait]
impl ApiWrites for StripeWrites {
    fn max_rows_per_statement(&self) -> u64 {
        100
    }

    fn read_only_columns(&self, _collection: &CollectionId, verb: &str) -> Vec<String> {
        let mut columns: Vec<String> = ALWAYS_READ_ONLY.iter().map(|c| (*c).to_owned()).collect();
        if verb != "insert" {
            columns.push("id".into());
        }
        columns
    }

    async fn write(
        &self,
        client: &Client,
        account: Option<&str>,
        collection: &CollectionId,
        change: &UpstreamChange,
        idempotency_key: &str,
    ) -> Result<Applied, ApiError> {
        let path = list_path(collection).ok_or_else(|| ApiError::Refused {
            status: 400,
            message: format!("{}: sluice does not write this object", collection.0),
            code: None,
        })?;
        let mut headers = vec![("Idempotency-Key", idempotency_key)];
        if let Some(account) = account {
            headers.push(("Stripe-Account", account));
        }
        let (method, url, body) = match change {
            UpstreamChange::Insert { values } => {
                (Method::POST, format!("/v1/{path}"), Some(form(values)))
            }
            UpstreamChange::Update { id, values } => (
                Method::POST,
                format!("/v1/{path}/{}", id.0),
                Some(form(values)),
            ),
            UpstreamChange::Delete { id } => (Method::DELETE, format!("/v1/{path}/{}", id.0), None),
        };
        let answer = client
            .send(method, &url, &[], body.as_deref(), &headers)
            .await?;
        let Value::Object(object) = answer.body else {
            return Err(ApiError::Malformed(format!(
                "{url} answered with something other than an object"
            )));
        };
        let id = object
            .get("id")
            .and_then(Value::as_str)
            .ok_or_else(|| ApiError::Malformed(format!("{url} answered without an id")))?
            .to_owned();
        let deleted = object.get("deleted").and_then(Value::as_bool) == Some(true);
        Ok(Applied {
            id,
            object: (!deleted).then_some(object),
            at: answer.date,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn column(text: Option<&str>, sql_type: &str) -> Column {
        Column {
            text: text.map(str::to_owned),
            sql_type: sql_type.into(),
        }
    }

    #[test]
    fn columns_become_stripes_form_parameters() {
        let values = Columns::from([
            ("email".into(), column(Some("a@example.com"), "text")),
            ("balance".into(), column(Some("-1500"), "bigint")),
            (
                "metadata".into(),
                column(Some(r#"{"plan": "pro", "seats": 3}"#), "jsonb"),
            ),
            (
                "preferred_locales".into(),
                column(Some(r#"["en", "fr"]"#), "jsonb"),
            ),
            ("phone".into(), column(None, "text")),
            ("delinquent".into(), column(Some("f"), "boolean")),
            (
                "trial_end".into(),
                column(Some("2026-12-03 21:40:18+00"), "timestamp with time zone"),
            ),
        ]);
        assert_eq!(
            form(&values),
            [
                ("balance", "-1500"),
                ("delinquent", "false"),
                ("email", "a@example.com"),
                ("metadata[plan]", "pro"),
                ("metadata[seats]", "3"),
                ("phone", ""),
                ("preferred_locales[0]", "en"),
                ("preferred_locales[1]", "fr"),
                ("trial_end", "1796334018"),
            ]
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
        );
        assert_eq!(unix_seconds("1970-01-01 01:00:00+01"), Some(0));
        assert_eq!(unix_seconds("1970-01-01 00:00:01.5+00"), Some(1));
    }
}
