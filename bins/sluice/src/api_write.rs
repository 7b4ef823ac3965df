//! The management API's writes: create, replace and delete targets, syncs and consumers.
//!
//! The config file is never written. Entities created here are kept in
//! `<data_dir>/managed.toml` (see [`sluice_core::Managed`]) and join the file's whenever the
//! config is loaded, so they survive a restart. An entity the file declares cannot be created,
//! changed or deleted here (`409`, naming the file). Each write is checked exactly as
//! `sluice config check` checks the file (`400` with the same messages), saved, and applied
//! at once, as a reload of the file would be.

use std::path::{Path, PathBuf};

use axum::body::Bytes;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use sluice_core::{Config, ConsumerConfig, Managed, ManagedKind, SyncConfig, TargetConfig};

use crate::server::Server;

/// What to do with the managed entity.
pub(crate) enum Write {
    /// Create from the body.
    Create(Bytes),
    /// Replace the one named so with the body.
    Replace(String, Bytes),
    /// Delete the one named so.
    Delete(String),
}

/// A refusal: the status, the message, and the problems behind it (each with its fix).
pub(crate) struct Refusal {
    status: StatusCode,
    message: String,
    field: Option<String>,
    problems: Vec<sluice_core::Problem>,
}

impl Refusal {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Refusal {
            status,
            message: message.into(),
            field: None,
            problems: Vec::new(),
        }
    }

    /// The message, and each problem with its fix, for a person (the console).
    pub(crate) fn text(&self) -> String {
        let mut out = self.message.clone();
        for p in &self.problems {
            out.push_str(&format!("\n{}\n  fix: {}", p.message, p.fix));
        }
        out
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let problems: Vec<Value> = self
            .problems
            .iter()
            .map(|p| json!({"message": p.message, "fix": p.fix}))
            .collect();
        let mut body = json!({"error": self.message});
        if let Some(field) = self.field {
            body["field"] = json!(field);
        }
        if !problems.is_empty() {
            body["problems"] = json!(problems);
        }
        (self.status, axum::Json(body)).into_response()
    }
}

/// An entity as the API takes it.
enum Entity {
    Target(TargetConfig),
    Sync(SyncConfig),
    Consumer(ConsumerConfig),
}

impl Entity {
    fn name(&self) -> &str {
        match self {
            Entity::Target(t) => &t.name,
            Entity::Sync(s) => &s.name,
            Entity::Consumer(c) => &c.name.0,
        }
    }

    fn json(&self) -> Value {
        match self {
            Entity::Target(t) => json!(t),
            Entity::Sync(s) => json!(s),
            Entity::Consumer(c) => json!(c),
        }
    }
}

/// Parses a body as an entity of `kind`, naming the field that is wrong. A sync without an
/// `id` gets a fresh one; a password or key given as `{"value": "…"}` is stored in a file of
/// its own (mode 0600, in `<data_dir>/secrets`) and referred to by path, never kept inline.
fn parse(kind: ManagedKind, body: &[u8], data_dir: &Path) -> Result<Entity, Refusal> {
    let mut value: Value = serde_json::from_slice(body).map_err(|e| {
        Refusal::new(
            StatusCode::BAD_REQUEST,
            format!("the body is not JSON: {e}"),
        )
    })?;
    if !value.is_object() {
        return Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            format!(
                "the body must be a JSON object: the {} as in sluice.toml",
                kind.name()
            ),
        ));
    }
    if kind == ManagedKind::Sync && value.get("id").is_none() {
        value["id"] = json!(uuid::Uuid::new_v4().to_string());
    }
    let name = value
        .get("name")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    if name.is_empty() || name.len() > 63 || name.chars().any(|c| c.is_control() || c == '/') {
        let mut refusal = Refusal::new(
            StatusCode::BAD_REQUEST,
            format!(
                "name: expected a non-empty name of at most 63 characters without '/' or control characters for the {}",
                kind.name()
            ),
        );
        refusal.field = Some("name".into());
        return Err(refusal);
    }
    for pointer in [
        "/connection/password",
        "/source/connection/password",
        "/source/key",
    ] {
        if let Some(secret) = value.pointer_mut(pointer)
            && let Some(text) = secret.get("value").and_then(Value::as_str)
        {
            let field = pointer.trim_start_matches('/').replace('/', ".");
            let path = store_secret(data_dir, kind, &name, &field, text).map_err(|e| {
                Refusal::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("cannot store {field} in the data directory: {e}"),
                )
            })?;
            *secret = json!({ "file": path });
        }
    }
    fn typed<T: DeserializeOwned>(kind: ManagedKind, value: Value) -> Result<T, Refusal> {
        serde_path_to_error::deserialize(value).map_err(|e| {
            let field = e.path().to_string();
            let mut refusal = Refusal::new(
                StatusCode::BAD_REQUEST,
                format!("{}: {field}: {}", kind.name(), e.inner()),
            );
            refusal.field = Some(field);
            refusal
        })
    }
    Ok(match kind {
        ManagedKind::Target => Entity::Target(typed(kind, value)?),
        ManagedKind::Sync => Entity::Sync(typed(kind, value)?),
        ManagedKind::Consumer => Entity::Consumer(typed(kind, value)?),
    })
}

/// Writes a secret given inline into its own file; the path to refer to it by.
fn store_secret(
    data_dir: &Path,
    kind: ManagedKind,
    name: &str,
    field: &str,
    value: &str,
) -> std::io::Result<PathBuf> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let dir = data_dir.join("secrets");
    std::fs::create_dir_all(&dir)?;
    let safe: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let path = std::path::absolute(dir.join(format!("{}-{safe}-{field}", kind.name())))?;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)?;
    file.write_all(value.as_bytes())?;
    Ok(path)
}

fn declared(file: &Config, kind: ManagedKind, name: &str) -> bool {
    match kind {
        ManagedKind::Target => file.targets.iter().any(|t| t.name == name),
        ManagedKind::Sync => file.syncs.iter().any(|s| s.name == name),
        ManagedKind::Consumer => file.consumers.iter().any(|c| c.name.0 == name),
    }
}

fn in_file(kind: ManagedKind, name: &str, path: &Path) -> Refusal {
    Refusal::new(
        StatusCode::CONFLICT,
        format!(
            "{} {name:?} is declared in {}: the file is the source of truth for what it declares, so change it there (it is reloaded when saved)",
            kind.name(),
            path.display()
        ),
    )
}

/// Applies one write: checks it against the file and the other managed entities, saves
/// `managed.toml`, and brings what runs in line. Returns the status and the entity.
pub(crate) async fn apply(
    server: &Server,
    kind: ManagedKind,
    write: Write,
) -> Result<(StatusCode, Value), Refusal> {
    let _one_at_a_time = server.writes.lock().await;
    let Some(path) = server.config_path.get() else {
        return Err(Refusal::new(
            StatusCode::CONFLICT,
            "this server runs without a config file: nothing can be created through the API",
        ));
    };
    let file = Config::load(path).map_err(|e| {
        Refusal::new(
            StatusCode::CONFLICT,
            format!(
                "the config file cannot be used, so nothing is changed until it is corrected: {e}"
            ),
        )
    })?;
    let mut managed = Managed::load(&file.data_dir)
        .map_err(|e| Refusal::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    let (status, entity) = match write {
        Write::Create(body) => {
            let entity = parse(kind, &body, &file.data_dir)?;
            let name = entity.name().to_owned();
            if declared(&file, kind, &name) {
                return Err(in_file(kind, &name, path));
            }
            if managed.has(kind, &name) {
                return Err(Refusal::new(
                    StatusCode::CONFLICT,
                    format!(
                        "{} {name:?} already exists (created through the API): PUT /v1/{}s/{name} changes it",
                        kind.name(),
                        kind.name()
                    ),
                ));
            }
            add(&mut managed, &entity);
            (StatusCode::CREATED, Some(entity))
        }
        Write::Replace(name, body) => {
            if declared(&file, kind, &name) {
                return Err(in_file(kind, &name, path));
            }
            if !managed.remove(kind, &name) {
                return Err(Refusal::new(
                    StatusCode::NOT_FOUND,
                    format!("no {} named {name:?}", kind.name()),
                ));
            }
            let entity = parse(kind, &body, &file.data_dir)?;
            if entity.name() != name {
                let mut refusal = Refusal::new(
                    StatusCode::BAD_REQUEST,
                    format!(
                        "name: the body names {:?} but the path {name:?}; a rename is a delete and a create",
                        entity.name()
                    ),
                );
                refusal.field = Some("name".into());
                return Err(refusal);
            }
            add(&mut managed, &entity);
            (StatusCode::OK, Some(entity))
        }
        Write::Delete(name) => {
            if declared(&file, kind, &name) {
                return Err(in_file(kind, &name, path));
            }
            if !managed.remove(kind, &name) {
                return Err(Refusal::new(
                    StatusCode::NOT_FOUND,
                    format!("no {} named {name:?}", kind.name()),
                ));
            }
            (StatusCode::OK, None)
        }
    };
    let merged = managed.merged(&file);
    let problems = merged.problems();
    if !problems.is_empty() {
        let (status, message) = match &entity {
            Some(_) => (
                StatusCode::BAD_REQUEST,
                format!("the {} is not valid in this config", kind.name()),
            ),
            None => (
                StatusCode::CONFLICT,
                format!(
                    "deleting the {} would leave the config inconsistent",
                    kind.name()
                ),
            ),
        };
        let mut refusal = Refusal::new(status, message);
        refusal.problems = problems;
        return Err(refusal);
    }
    managed.save(&file.data_dir).map_err(|e| {
        Refusal::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!(
                "cannot save {}: {e}",
                Managed::path(&file.data_dir).display()
            ),
        )
    })?;
    tracing::info!(
        kind = kind.name(),
        "the API changed a managed entity: reconciling"
    );
    // The file was read again and is consistent with the change: a reload refused before
    // (such as a name clash this write resolved) is over.
    server.reload_refused(None);
    server.reconcile(&merged).await;
    Ok((
        status,
        entity
            .map(|e| e.json())
            .unwrap_or_else(|| json!({"deleted": true})),
    ))
}

fn add(managed: &mut Managed, entity: &Entity) {
    match entity {
        Entity::Target(t) => managed.targets.push(t.clone()),
        Entity::Sync(s) => managed.syncs.push(s.clone()),
        Entity::Consumer(c) => managed.consumers.push(c.clone()),
    }
}

/// The entities created through the API that run now (to tell them from the file's).
pub(crate) fn managed_now(server: &Server) -> Managed {
    server
        .applied_config()
        .and_then(|config| Managed::load(&config.data_dir).ok())
        .unwrap_or_default()
}

/// The routes: `POST /v1/{kind}s`, `PUT` and `DELETE /v1/{kind}s/{name}`.
pub(crate) mod routes {
    use axum::body::Bytes;
    use axum::extract::{Path, State};
    use axum::response::{IntoResponse, Response};
    use sluice_core::ManagedKind;

    use super::{Write, apply};
    use crate::api::App;

    async fn run(app: App, kind: ManagedKind, write: Write) -> Response {
        match apply(&app.server, kind, write).await {
            Ok((status, body)) => (status, axum::Json(body)).into_response(),
            Err(refusal) => refusal.into_response(),
        }
    }

    macro_rules! handlers {
        ($kind:expr, $create:ident, $replace:ident, $delete:ident) => {
            pub(crate) async fn $create(State(app): State<App>, body: Bytes) -> Response {
                run(app, $kind, Write::Create(body)).await
            }
            pub(crate) async fn $replace(
                State(app): State<App>,
                Path(name): Path<String>,
                body: Bytes,
            ) -> Response {
                run(app, $kind, Write::Replace(name, body)).await
            }
            pub(crate) async fn $delete(
                State(app): State<App>,
                Path(name): Path<String>,
            ) -> Response {
                run(app, $kind, Write::Delete(name)).await
            }
        };
    }

    handlers!(
        ManagedKind::Target,
        create_target,
        replace_target,
        delete_target
    );
    handlers!(ManagedKind::Sync, create_sync, replace_sync, delete_sync);
    handlers!(
        ManagedKind::Consumer,
        create_consumer,
        replace_consumer,
        delete_consumer
    );
}
