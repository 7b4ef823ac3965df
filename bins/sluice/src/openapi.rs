//! The OpenAPI 3.1 document of `sluice serve`'s API (served at `/v1/openapi.json`).

use serde_json::{Value, json};

/// The OpenAPI 3.1 document for this API.
pub fn document() -> Value {
    let entity = |summary: &str| json!({"get": {"summary": summary, "responses": {"200": {"description": "JSON"}, "401": {"$ref": "#/components/responses/Unauthorized"}, "404": {"description": "no such entity"}}}});
    let action = |summary: &str| json!({"post": {"summary": summary, "responses": {"200": {"description": "the consumer after the action"}, "401": {"$ref": "#/components/responses/Unauthorized"}, "404": {"description": "no such consumer"}}}});
    let name =
        json!([{"name": "name", "in": "path", "required": true, "schema": {"type": "string"}}]);
    let mut paths = serde_json::Map::new();
    paths.insert("/v1/status".into(), entity("Every entity's health"));
    paths.insert("/v1/targets".into(), entity("List targets with health"));
    paths.insert("/v1/targets/{name}".into(), entity("One target"));
    paths.insert(
        "/v1/syncs".into(),
        entity("List syncs with health and backfill progress"),
    );
    paths.insert("/v1/syncs/{name}".into(), entity("One sync"));
    paths.insert(
        "/v1/consumers".into(),
        entity("List consumers with lag and health"),
    );
    paths.insert("/v1/consumers/{name}".into(), entity("One consumer"));
    paths.insert(
        "/v1/consumers/{name}/pause".into(),
        action("Pause a consumer (optional body {\"reason\": \"…\"})"),
    );
    paths.insert(
        "/v1/consumers/{name}/resume".into(),
        action("Resume a paused consumer"),
    );
    paths.insert(
        "/v1/consumers/{name}/restart-backfill".into(),
        action("Re-send every record from the start of the stream"),
    );
    paths.insert("/v1/syncs/{name}/records".into(), json!({"post": {
        "summary": "Push a batch of upserts and deletes into an http sync",
        "requestBody": {"required": true, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/PushBody"}}}},
        "responses": {
            "200": {"description": "accepted count, stale count, and each rejected record's index and reason", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/PushResult"}}}},
            "400": {"description": "the body is not valid JSON of the expected shape; nothing was written"},
            "401": {"$ref": "#/components/responses/Unauthorized"},
            "413": {"description": "the body is larger than [api] max_body_bytes; nothing was written"},
            "503": {"description": "the records stream could not be written; nothing was written"}
        }
    }}));
    let write = |summary: &str, ok: &str| {
        json!({"summary": summary,
        "requestBody": {"required": true, "content": {"application/json": {"schema": {"type": "object", "description": "the entity as in sluice.toml, as JSON; a password or key may be {\"env\": …}, {\"file\": …} or {\"value\": …} (stored in a 0600 file under the data directory)"}}}},
        "responses": {ok: {"description": "the entity as stored"},
            "400": {"$ref": "#/components/responses/Invalid"},
            "401": {"$ref": "#/components/responses/Unauthorized"},
            "404": {"description": "no such entity"},
            "409": {"$ref": "#/components/responses/Conflict"}}})
    };
    let delete = |summary: &str| {
        json!({"summary": summary, "responses": {
        "200": {"description": "deleted; what ran for it is stopped (rows stay in the target)"},
        "401": {"$ref": "#/components/responses/Unauthorized"},
        "404": {"description": "no such entity"},
        "409": {"$ref": "#/components/responses/Conflict"}}})
    };
    for kind in ["target", "sync", "consumer"] {
        let list = format!("/v1/{kind}s");
        paths[&list]["post"] = write(
            &format!("Create a {kind} (kept in <data_dir>/managed.toml)"),
            "201",
        );
        let one = format!("/v1/{kind}s/{{name}}");
        paths[&one]["put"] = write(&format!("Replace a {kind} created through the API"), "200");
        paths[&one]["delete"] = delete(&format!("Delete a {kind} created through the API"));
    }
    let tool = |method: &str, summary: &str, body: Option<Value>| {
        let mut op = json!({"summary": summary, "responses": {"200": {"description": "JSON"}, "401": {"$ref": "#/components/responses/Unauthorized"}, "404": {"description": "no such entity"}, "422": {"description": "the work failed for a reason to fix (error and fix)"}, "503": {"description": "the database could not be reached; try again"}}});
        if let Some(schema) = body {
            op["requestBody"] =
                json!({"required": true, "content": {"application/json": {"schema": schema}}});
        }
        json!({ method: op })
    };
    let users = json!({"type": "object", "required": ["users"], "properties": {"users": {"type": "array", "items": {"type": "string"}}}});
    paths.insert(
        "/v1/targets/{name}/setup".into(),
        tool(
            "get",
            "The target's setup: the SQL to run yourself (manual path) and the automated command",
            None,
        ),
    );
    paths.insert(
        "/v1/targets/{name}/check".into(),
        tool(
            "post",
            "Run the target's setup check as its sync user: each finding with its fix",
            None,
        ),
    );
    paths.insert(
        "/v1/targets/{name}/grant-read".into(),
        tool(
            "post",
            "Grant the target's read role to users",
            Some(users.clone()),
        ),
    );
    paths.insert(
        "/v1/targets/{name}/revoke-read".into(),
        tool(
            "post",
            "Revoke the target's read role from users",
            Some(users),
        ),
    );
    paths.insert(
        "/v1/consumers/{name}/create-table".into(),
        tool("get", "The consumer table's CREATE TABLE statement", None),
    );
    paths.insert(
        "/v1/consumers/{name}/verify".into(),
        tool("post", "Verify the consumer's table on its target", None),
    );
    paths.insert("/metrics".into(), json!({"get": {"summary": "Prometheus metrics", "responses": {"200": {"description": "text/plain exposition format"}, "401": {"$ref": "#/components/responses/Unauthorized"}}}}));
    for (path, item) in paths.iter_mut() {
        if path.contains("{name}")
            && let Some(ops) = item.as_object_mut()
        {
            for op in ops.values_mut() {
                op["parameters"] = name.clone();
            }
        }
    }
    json!({
        "openapi": "3.1.0",
        "info": {"title": "sluice", "version": env!("CARGO_PKG_VERSION")},
        "security": [{"bearer": []}],
        "paths": paths,
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "responses": {
                "Unauthorized": {"description": "no bearer token, or a wrong one"},
                "Invalid": {"description": "the body is not a valid entity: error names the field and what was expected; problems lists what `sluice config check` would say, each with its fix"},
                "Conflict": {"description": "the entity is declared in the config file (named in the error: change it there), already exists, or is still used by another"}
            },
            "schemas": {
                "PushBody": {"type": "object", "required": ["records"], "additionalProperties": false, "properties": {"records": {"type": "array", "items": {
                    "type": "object", "required": ["collection", "id"], "additionalProperties": false,
                    "properties": {
                        "collection": {"type": "string", "maxLength": 1024},
                        "id": {"type": "string", "maxLength": 1024},
                        "payload": {"type": "object", "description": "required unless deleted"},
                        "deleted": {"type": "boolean"},
                        "version": {"type": "integer", "minimum": 0, "description": "orders changes of one record; default: the time of receipt"},
                        "updated_at": {"type": "string", "format": "date-time"}
                    }}}}},
                "PushResult": {"type": "object", "properties": {
                    "accepted": {"type": "integer"},
                    "stale": {"type": "integer", "description": "accepted but older than what the stream holds"},
                    "rejected": {"type": "array", "items": {"type": "object", "properties": {"index": {"type": "integer"}, "reason": {"type": "string"}}}}
                }}
            }
        }
    })
}
