//! The web console `sluice serve` offers at `/`: pages rendered by the server (maud), one
//! stylesheet built into the binary, no script, no Node build step.
//!
//! Security: every page needs a login (the API token, or `[api] console_password`); the
//! session cookie is `HttpOnly`, `SameSite=Strict`, and `Secure` when served over TLS
//! (`[api] tls`, or `X-Forwarded-Proto: https` from a TLS proxy in front). Every form that
//! changes something carries the session's CSRF token, and a cross-origin `POST` is refused.
//! No secret is rendered: passwords show as set or unset. A failed login is logged with the
//! client's address, never with what was typed.

mod activity;
mod forms;
mod pages;
pub mod samples;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{ConnectInfo, Form, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use maud::{DOCTYPE, Markup, html};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use crate::api::equal;
use crate::server::Server;

/// The session cookie's name.
const COOKIE: &str = "sluice_session";
/// How long a session lasts.
const SESSION_FOR: Duration = Duration::from_secs(12 * 3600);

/// One logged-in browser.
#[derive(Clone)]
pub(crate) struct Session {
    /// The token every changing form carries.
    pub(crate) csrf: String,
    expires: Instant,
}

#[derive(Clone)]
pub(crate) struct Console {
    pub(crate) server: Arc<Server>,
    token: Arc<SecretString>,
    password: Option<Arc<SecretString>>,
    /// Served over TLS (`[api] tls`).
    tls: bool,
    sessions: Arc<Mutex<HashMap<String, Session>>>,
}

/// A random token (two v4 UUIDs: 244 random bits from the OS).
fn random_token() -> String {
    format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    )
}

/// The console's routes; `token` and `password` are what logs in; `tls` when served over
/// https.
pub fn router(
    server: Arc<Server>,
    token: Arc<SecretString>,
    password: Option<SecretString>,
    tls: bool,
) -> Router {
    let console = Console {
        server,
        token,
        password: password.map(Arc::new),
        tls,
        sessions: Arc::new(Mutex::new(HashMap::new())),
    };
    let pages = Router::new()
        .route("/", get(pages::overview))
        .route("/events", get(activity::events))
        .route("/records", get(activity::records))
        .route(
            "/targets/new",
            get(forms::new_target).post(forms::create_target),
        )
        .route("/targets/{name}", get(pages::target))
        .route("/targets/{name}/check", post(forms::check_target))
        .route("/targets/{name}/readers", post(forms::readers))
        .route("/targets/{name}/delete", post(forms::delete_target))
        .route(
            "/consumers/new",
            get(forms::new_consumer).post(forms::create_consumer),
        )
        .route("/consumers/{name}", get(pages::consumer))
        .route("/consumers/{name}/verify", post(forms::verify_consumer))
        .route("/consumers/{name}/control", post(forms::control))
        .route("/consumers/{name}/delete", post(forms::delete_consumer))
        .route("/syncs/{name}", get(activity::sync))
        .route("/logout", post(logout))
        .route_layer(middleware::from_fn_with_state(
            console.clone(),
            require_session,
        ));
    Router::new()
        .route("/login", get(login_page).post(login))
        .route("/assets/console.css", get(stylesheet))
        .merge(pages)
        .layer(middleware::from_fn(same_origin))
        .with_state(console)
}

async fn stylesheet() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "max-age=3600"),
        ],
        include_str!("console.css"),
    )
        .into_response()
}

/// Refuses a `POST` whose `Origin` is another site's (a browser always sends it on a
/// cross-origin form post).
async fn same_origin(request: Request, next: Next) -> Response {
    if request.method() == axum::http::Method::POST {
        let headers = request.headers();
        let host = headers.get(header::HOST).and_then(|v| v.to_str().ok());
        let origin = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok());
        if let (Some(origin), Some(host)) = (origin, host) {
            let origin_host = origin.split("://").nth(1).unwrap_or(origin);
            if origin != "null" && origin_host != host {
                return (
                    StatusCode::FORBIDDEN,
                    "refused: a form from another site may not change sluice",
                )
                    .into_response();
            }
        }
    }
    next.run(request).await
}

fn session_id(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value.to_owned())
}

async fn require_session(
    State(console): State<Console>,
    mut request: Request,
    next: Next,
) -> Response {
    let session = session_id(request.headers()).and_then(|id| {
        let mut sessions = console.sessions.lock().unwrap_or_else(|e| e.into_inner());
        sessions.retain(|_, s| s.expires > Instant::now());
        sessions.get(&id).cloned()
    });
    match session {
        Some(session) => {
            request.extensions_mut().insert(session);
            next.run(request).await
        }
        None if request.method() == axum::http::Method::GET => {
            Redirect::to("/login").into_response()
        }
        None => (
            StatusCode::FORBIDDEN,
            "your session has ended: log in again at /login",
        )
            .into_response(),
    }
}

/// Every form a logged-in page posts carries the session's CSRF token.
pub(crate) trait CsrfToken {
    /// The token the form carried.
    fn csrf(&self) -> &str;
}

/// A form posted from a logged-in page: the session and the form, refused (`403`) unless it
/// carries the session's CSRF token, so no handler can forget the check.
pub(crate) struct Checked<T>(pub(crate) Session, pub(crate) T);

impl<S, T> axum::extract::FromRequest<S> for Checked<T>
where
    S: Send + Sync,
    T: serde::de::DeserializeOwned + CsrfToken + Send,
{
    type Rejection = Response;

    async fn from_request(request: Request, state: &S) -> Result<Self, Response> {
        let session = request
            .extensions()
            .get::<Session>()
            .cloned()
            .ok_or_else(|| (StatusCode::FORBIDDEN, "log in first: /login").into_response())?;
        let Form(form) = Form::<T>::from_request(request, state)
            .await
            .map_err(IntoResponse::into_response)?;
        match csrf_refusal(&session, form.csrf()) {
            Some(refused) => Err(refused),
            None => Ok(Checked(session, form)),
        }
    }
}

/// The refusal of a form whose CSRF token is not the session's; `None` when it is.
fn csrf_refusal(session: &Session, presented: &str) -> Option<Response> {
    (!equal(session.csrf.as_bytes(), presented.as_bytes())).then(|| {
        (
            StatusCode::FORBIDDEN,
            "refused: the form's security token is missing or stale; reload the page and try again",
        )
            .into_response()
    })
}

/// Whether the browser reached the console over https: served with `[api] tls`, or behind a
/// TLS proxy that says so.
fn secure(console: &Console, headers: &HeaderMap) -> bool {
    console.tls
        || headers
            .get("x-forwarded-proto")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.eq_ignore_ascii_case("https"))
}

async fn login_page() -> Response {
    login_form(None, StatusCode::OK)
}

fn login_form(error: Option<&str>, status: StatusCode) -> Response {
    let body = html! {
        main #main .narrow {
            h1 { "sluice" }
            form method="post" action="/login" {
                @if let Some(error) = error {
                    p.error role="alert" { (error) }
                }
                label for="secret" { "API token or console password" }
                input #secret type="password" name="secret" autocomplete="current-password" required autofocus;
                button type="submit" { "Log in" }
            }
        }
    };
    (status, document("Log in", None, body)).into_response()
}

#[derive(Deserialize)]
pub(crate) struct Login {
    secret: String,
}

async fn login(
    State(console): State<Console>,
    ConnectInfo(client): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Form(form): Form<Login>,
) -> Response {
    let given = form.secret.as_bytes();
    let good = equal(given, console.token.expose_secret().as_bytes())
        || console
            .password
            .as_ref()
            .is_some_and(|p| equal(given, p.expose_secret().as_bytes()));
    drop(form);
    if !good {
        tracing::warn!(client = %client, "console: failed login");
        tokio::time::sleep(Duration::from_millis(500)).await;
        return login_form(
            Some("That is neither the API token nor the console password."),
            StatusCode::UNAUTHORIZED,
        );
    }
    let id = random_token();
    console
        .sessions
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(
            id.clone(),
            Session {
                csrf: random_token(),
                expires: Instant::now() + SESSION_FOR,
            },
        );
    tracing::info!(client = %client, "console: logged in");
    let cookie = format!(
        "{COOKIE}={id}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}{}",
        SESSION_FOR.as_secs(),
        if secure(&console, &headers) {
            "; Secure"
        } else {
            ""
        }
    );
    let mut response = Redirect::to("/").into_response();
    if let Ok(value) = HeaderValue::from_str(&cookie) {
        response.headers_mut().insert(header::SET_COOKIE, value);
    }
    response
}

#[derive(Deserialize)]
pub(crate) struct CsrfOnly {
    #[serde(default)]
    csrf: String,
}

impl CsrfToken for CsrfOnly {
    fn csrf(&self) -> &str {
        &self.csrf
    }
}

async fn logout(
    State(console): State<Console>,
    headers: HeaderMap,
    Checked(_session, _form): Checked<CsrfOnly>,
) -> Response {
    if let Some(id) = session_id(&headers) {
        console
            .sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
    }
    let mut response = Redirect::to("/login").into_response();
    response.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static("sluice_session=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0"),
    );
    response
}

/// A whole page: the navigation (when logged in) and `body`.
pub(crate) fn document(title: &str, session: Option<&Session>, body: Markup) -> Html<String> {
    let markup = html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · sluice" }
                link rel="stylesheet" href="/assets/console.css";
            }
            body {
                a.skip href="#main" { "Skip to content" }
                @if let Some(session) = session {
                    header {
                        nav aria-label="Main" {
                            a.brand href="/" { "sluice" }
                            a href="/" { "Overview" }
                            a href="/events" { "Event log" }
                            a href="/records" { "Record lookup" }
                            a href="/targets/new" { "Add a target" }
                            a href="/consumers/new" { "Add a consumer" }
                        }
                        form.logout method="post" action="/logout" {
                            input type="hidden" name="csrf" value=(session.csrf);
                            button type="submit" { "Log out" }
                        }
                    }
                }
                (body)
            }
        }
    };
    Html(markup.into_string())
}

/// `name` as one path segment of a link: everything but unreserved characters
/// percent-encoded, so any entity name (spaces, `?`, `#`, `/`, quotes) links to its page.
pub(crate) fn segment(name: &str) -> String {
    name.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// A link-safe form of `text` for a query string.
pub(crate) fn query_value(text: &str) -> String {
    url::form_urlencoded::byte_serialize(text.as_bytes()).collect()
}
