//! Catalog queries: what the server is and what the connected role may do.
//!
//! Every query here is checked at compile time (`sqlx::query!`) against the committed
//! offline data in `.sqlx`; `cargo xtask codegen` regenerates it.

use sqlx::PgConnection;

/// Facts about the server and the session, read in one round trip.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerFacts {
    /// `server_version_num`, e.g. `150018` for 15.18.
    pub version_num: i32,
    /// `server_version`, e.g. `15.18 (Debian 15.18-0+deb12u1)`.
    pub version: String,
    /// `wal_level` (`replica`, `logical`, …).
    pub wal_level: String,
    /// The role the session is authenticated as.
    pub current_user: String,
    /// The connected database.
    pub database: String,
    /// Whether this session is encrypted with TLS.
    pub ssl: bool,
}

impl ServerFacts {
    /// The major version (`15` for 15.18, `9` for 9.6).
    pub fn major_version(&self) -> i32 {
        if self.version_num >= 100_000 {
            self.version_num / 10_000
        } else {
            self.version_num / 100
        }
    }
}

/// Reads [`ServerFacts`] for the connection.
pub async fn server_facts(conn: &mut PgConnection) -> Result<ServerFacts, sqlx::Error> {
    sqlx::query_as!(
        ServerFacts,
        r#"select current_setting('server_version_num')::int4 as "version_num!",
                  current_setting('server_version') as "version!",
                  current_setting('wal_level') as "wal_level!",
                  current_user::text as "current_user!",
                  current_database()::text as "database!",
                  coalesce((select ssl from pg_stat_ssl where pid = pg_backend_pid()), false) as "ssl!""#
    )
    .fetch_one(conn)
    .await
}

/// What the connected role may do on a database.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DatabasePrivileges {
    /// May connect.
    pub connect: bool,
    /// May create schemas.
    pub create: bool,
}

/// The connected role's privileges on `database`; `None` when no such database exists.
pub async fn database_privileges(
    conn: &mut PgConnection,
    database: &str,
) -> Result<Option<DatabasePrivileges>, sqlx::Error> {
    let row = sqlx::query!(
        r#"select has_database_privilege(oid, 'CONNECT') as "connect!",
                  has_database_privilege(oid, 'CREATE') as "create!"
           from pg_database where datname = $1"#,
        database
    )
    .fetch_optional(conn)
    .await?;
    Ok(row.map(|r| DatabasePrivileges {
        connect: r.connect,
        create: r.create,
    }))
}

/// A role as the catalog sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RoleFacts {
    /// May log in.
    pub can_login: bool,
    /// Is a superuser.
    pub superuser: bool,
    /// Has the REPLICATION attribute.
    pub replication: bool,
}

/// The role named `name`, if it exists.
pub async fn role(conn: &mut PgConnection, name: &str) -> Result<Option<RoleFacts>, sqlx::Error> {
    sqlx::query_as!(
        RoleFacts,
        r#"select rolcanlogin as "can_login!", rolsuper as "superuser!", rolreplication as "replication!"
           from pg_roles where rolname = $1"#,
        name
    )
    .fetch_optional(conn)
    .await
}

/// The owner of schema `name`, if the schema exists.
pub async fn schema_owner(
    conn: &mut PgConnection,
    name: &str,
) -> Result<Option<String>, sqlx::Error> {
    sqlx::query_scalar!(
        r#"select pg_get_userbyid(nspowner)::text as "owner!" from pg_namespace where nspname = $1"#,
        name
    )
    .fetch_optional(conn)
    .await
}

/// Whether the table or view `qualified` (quoted as SQL: `"schema"."table"`) exists.
pub async fn relation_exists(
    conn: &mut PgConnection,
    qualified: &str,
) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar!(
        r#"select to_regclass($1) is not null as "exists!""#,
        qualified
    )
    .fetch_one(conn)
    .await
}
