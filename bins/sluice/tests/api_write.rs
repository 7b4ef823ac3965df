//! The management API's writes against `sluice serve` as a process: entities created through
//! it run at once, survive a restart, never overwrite what `sluice.toml` declares, and bad
//! input is refused naming the field; the target and consumer tools work on real clusters.

use std::os::unix::fs::PermissionsExt as _;
use std::time::Duration;

use serde_json::{Value, json};

mod support;
use support::*;

async fn send(api: &Api, method: &str, path: &str, body: Value) -> (u16, Value) {
    let (status, text) = api
        .call(method, path, Some(body.to_string()), Some(TOKEN))
        .await;
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

fn reports_target(env: &Env) -> Value {
    json!({
        "name": "reports",
        "connection": {
            "host": "127.0.0.1", "port": env.target.port(), "database": "postgres",
            "user": "sluice_sync", "password": {"value": "sync-pw"},
            "ssl": {"mode": "disable"}
        }
    })
}

#[tokio::test]
async fn entities_created_through_the_api_run_survive_a_restart_and_never_override_the_file() {
    let env = env().await;
    env.target
        .execute(
            "postgres",
            "grant sluice_read to sluice_sync with admin option; create role analyst;",
        )
        .await
        .unwrap();
    let path = write_config(&env, "");
    let (mut child, api) = serve_ready(&env, &path).await;

    // Writes need the token like everything else.
    let (status, _) = api
        .call(
            "POST",
            "/v1/targets",
            Some(reports_target(&env).to_string()),
            None,
        )
        .await;
    assert_eq!(status, 401);

    // What the file declares is the file's: 409, naming the file.
    let mut warehouse = reports_target(&env);
    warehouse["name"] = json!("warehouse");
    let (status, body) = send(&api, "POST", "/v1/targets", warehouse).await;
    assert_eq!(status, 409, "{body}");
    let file = path.display().to_string();
    assert!(body["error"].as_str().unwrap().contains(&file), "{body}");
    for (method, route) in [
        ("PUT", "/v1/consumers/app-records"),
        ("DELETE", "/v1/consumers/app-records"),
        ("DELETE", "/v1/targets/warehouse"),
        ("DELETE", "/v1/syncs/events"),
    ] {
        let body = json!({"name": route.rsplit('/').next().unwrap()});
        let (status, answer) = send(&api, method, route, body).await;
        assert_eq!(status, 409, "{method} {route}: {answer}");
        assert!(
            answer["error"].as_str().unwrap().contains(&file),
            "{answer}"
        );
    }

    // Bad input: the field and what was expected.
    let mut bad = reports_target(&env);
    bad["connection"]["port"] = json!("fifty");
    let (status, body) = send(&api, "POST", "/v1/targets", bad).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["field"], "connection.port", "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("expected"),
        "{body}"
    );
    let mut typo = reports_target(&env);
    typo["connection"]["databse"] = json!("postgres");
    let (status, body) = send(&api, "POST", "/v1/targets", typo).await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("databse"),
        "{body}"
    );
    let (status, body) = api
        .call(
            "POST",
            "/v1/targets",
            Some("{\"name\": ".into()),
            Some(TOKEN),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    // The same consistency checks as `config check`, with their fixes.
    let (status, body) = send(
        &api,
        "POST",
        "/v1/consumers",
        json!({"name": "orphan", "target": "warehose", "filter": {"provider": "http"},
               "layout": {"kind": "consumer_table", "schema": "sluice", "table": "orphan"}}),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    let problem = &body["problems"][0];
    assert!(
        problem["message"]
            .as_str()
            .unwrap()
            .contains("\"warehose\", which is not configured"),
        "{body}"
    );
    assert!(
        problem["fix"].as_str().unwrap().contains("warehouse"),
        "{body}"
    );

    // A new target no consumer writes to yet is reached anyway: a wrong password shows.
    let mut broken = reports_target(&env);
    broken["name"] = json!("broken");
    broken["connection"]["password"] = json!({"value": "wrong"});
    let (status, body) = send(&api, "POST", "/v1/targets", broken).await;
    assert_eq!(status, 201, "{body}");
    wait_until(
        "the wrong password shows in the target's health",
        &env,
        30,
        async || {
            let target = api.get("/v1/targets/broken").await;
            target["health"]["status"] == "error"
                && target["health"]["checks"]
                    .to_string()
                    .contains("password authentication failed")
        },
    )
    .await;
    let (status, body) = send(&api, "DELETE", "/v1/targets/broken", json!({})).await;
    assert_eq!(status, 200, "{body}");

    // A target and a consumer created through the API run at once.
    let (status, body) = send(&api, "POST", "/v1/targets", reports_target(&env)).await;
    assert_eq!(status, 201, "{body}");
    assert!(!body.to_string().contains("sync-pw"), "{body}");
    let managed = std::fs::read_to_string(env.dir.path().join("data/managed.toml")).unwrap();
    assert!(managed.contains("name = \"reports\""), "{managed}");
    assert!(
        !managed.contains("sync-pw"),
        "the password is not kept inline: {managed}"
    );
    let secret = env
        .dir
        .path()
        .join("data/secrets/target-reports-connection.password");
    assert_eq!(std::fs::read_to_string(&secret).unwrap(), "sync-pw");
    assert_eq!(
        std::fs::metadata(&secret).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let (status, body) = send(&api, "POST", "/v1/targets", reports_target(&env)).await;
    assert_eq!(status, 409, "twice: {body}");
    let consumer = json!({"name": "api-events", "target": "reports", "filter": {"provider": "http"},
        "layout": {"kind": "consumer_table", "schema": "sluice", "table": "api_events"},
        "batch": {"max_records": 100, "max_wait_ms": 20}});
    let (status, body) = send(&api, "POST", "/v1/consumers", consumer.clone()).await;
    assert_eq!(status, 201, "{body}");
    let (status, body) = send(
        &api,
        "POST",
        "/v1/syncs/events/records",
        json!({"records": [{"collection": "c", "id": "a1", "payload": {"n": 1}}]}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    wait_until(
        "the API's consumer wrote the pushed record",
        &env,
        60,
        async || target_count(&env, "sluice.api_events", "upstream_id = 'a1'").await == 1,
    )
    .await;
    assert_eq!(api.get("/v1/consumers/api-events").await["origin"], "api");
    assert_eq!(api.get("/v1/consumers/app-records").await["origin"], "file");
    assert_eq!(api.get("/v1/targets/reports").await["origin"], "api");

    // A target still written to cannot go.
    let (status, body) = send(&api, "DELETE", "/v1/targets/reports", json!({})).await;
    assert_eq!(status, 409, "{body}");
    assert!(
        body["problems"][0]["message"]
            .as_str()
            .unwrap()
            .contains("api-events"),
        "{body}"
    );

    // The tools: setup SQL (no password in it), setup check, CREATE TABLE, verification, grants.
    let setup = api.get("/v1/targets/reports/setup").await;
    let sql = setup["manual_sql"].as_str().unwrap();
    assert!(
        sql.contains("sluice_read") && sql.contains("sluice_sync"),
        "{sql}"
    );
    assert!(!sql.contains("sync-pw"), "{sql}");
    let (status, check) = send(&api, "POST", "/v1/targets/reports/check", json!({})).await;
    assert_eq!(status, 200, "{check}");
    assert!(check["findings"].as_array().unwrap().len() > 1, "{check}");
    let ddl = api.get("/v1/consumers/api-events/create-table").await;
    assert!(
        ddl["sql"]
            .as_str()
            .unwrap()
            .starts_with("create table \"sluice\".\"api_events\""),
        "{ddl}"
    );
    let (status, verified) = send(&api, "POST", "/v1/consumers/api-events/verify", json!({})).await;
    assert_eq!(status, 200, "{verified}");
    assert_eq!(verified["ok"], true, "{verified}");
    let (status, body) = send(
        &api,
        "POST",
        "/v1/targets/reports/grant-read",
        json!({"users": ["analyst"]}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        target_count(
            &env,
            "pg_auth_members m join pg_roles r on r.oid = m.roleid join pg_roles u on u.oid = m.member",
            "r.rolname = 'sluice_read' and u.rolname = 'analyst'"
        )
        .await,
        1
    );
    let (status, body) = send(
        &api,
        "POST",
        "/v1/targets/reports/revoke-read",
        json!({"users": ["analyst"]}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = send(
        &api,
        "POST",
        "/v1/targets/reports/grant-read",
        json!({"users": "analyst"}),
    )
    .await;
    assert_eq!(status, 400, "{body}");

    // A sync created through the API (without an id: it gets one) takes pushed records.
    let (status, body) = send(
        &api,
        "POST",
        "/v1/syncs",
        json!({"name": "webhooks", "source": {"provider": "http"}}),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    assert!(
        uuid::Uuid::parse_str(body["id"].as_str().unwrap()).is_ok(),
        "{body}"
    );
    let (status, body) = send(
        &api,
        "POST",
        "/v1/syncs/webhooks/records",
        json!({"records": [{"collection": "hooks", "id": "h1", "payload": {"ok": true}}]}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    wait_until(
        "the new sync's record reaches the http consumers",
        &env,
        30,
        async || target_count(&env, "sluice.api_events", "upstream_id = 'h1'").await == 1,
    )
    .await;
    let (status, body) = send(
        &api,
        "POST",
        "/v1/syncs",
        json!({"name": "bad", "source": {"provider": "stripe", "key": {"env": "X"}, "collections": ["customr"]}}),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["problems"][0]["fix"]
            .as_str()
            .unwrap()
            .contains("customer"),
        "{body}"
    );

    // A restart keeps what the API created.
    assert!(terminate(&mut child).success());
    let mut child = serve(&env, &path);
    wait_until(
        "the API's consumer runs again after a restart",
        &env,
        60,
        async || {
            api.call("GET", "/v1/consumers/api-events", None, Some(TOKEN))
                .await
                .0
                == 200
        },
    )
    .await;
    send(
        &api,
        "POST",
        "/v1/syncs/events/records",
        json!({"records": [{"collection": "c", "id": "a2", "payload": {"n": 2}}]}),
    )
    .await;
    wait_until(
        "records still reach the API's consumer",
        &env,
        60,
        async || target_count(&env, "sluice.api_events", "upstream_id = 'a2'").await == 1,
    )
    .await;

    // The file declaring the same name is not a silent override: the reload is refused.
    let clash = r#"
[[consumer]]
name = "api-events"
target = "warehouse"
filter = { provider = "http" }
layout = { kind = "consumer_table", schema = "sluice", table = "other" }
"#;
    std::fs::write(&path, config(&env, clash)).unwrap();
    wait_until("the clashing reload is refused", &env, 30, async || {
        let (_, out) = sluice_status(&env);
        out.contains("api-events") && out.contains("also created through the API")
    })
    .await;
    std::fs::write(&path, config(&env, "")).unwrap();
    wait_until("the config is applied again", &env, 60, async || {
        sluice_status(&env).0 == 0
    })
    .await;

    // Replace, then delete, through the API.
    let mut replaced = consumer.clone();
    replaced["batch"]["max_records"] = json!(50);
    let (status, body) = send(&api, "PUT", "/v1/consumers/api-events", replaced).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["batch"]["max_records"], 50, "{body}");
    let (status, body) = send(&api, "DELETE", "/v1/consumers/api-events", json!({})).await;
    assert_eq!(status, 200, "{body}");
    let (status, _) = api
        .call("GET", "/v1/consumers/api-events", None, Some(TOKEN))
        .await;
    assert_eq!(status, 404);
    let (status, body) = send(&api, "DELETE", "/v1/targets/reports", json!({})).await;
    assert_eq!(status, 200, "{body}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        target_count(&env, "sluice.api_events", "true").await,
        3,
        "deleting a consumer leaves its rows (a1, h1, a2)"
    );
    assert!(terminate(&mut child).success());
}
