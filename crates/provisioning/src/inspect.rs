//! Reading the current state of a target, as the admin or as the sync user.
//!
//! Every query is compile-checked (`sqlx::query_scalar!`) and tolerates missing roles and
//! schemas, answering "no" instead of failing.

use sqlx::PgConnection;

use crate::spec::{SchemaUse, SetupSpec};

/// An object in a schema owned by someone other than the sync user.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ForeignObject {
    /// `table`, `view`, …
    pub kind: String,
    /// Its name.
    pub name: String,
    /// Its owner.
    pub owner: String,
}

/// One schema's state.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SchemaState {
    /// The schema exists.
    pub exists: bool,
    /// Its owner, if it exists.
    pub owner: Option<String>,
    /// The sync user has USAGE / CREATE on it.
    pub sync_usage: bool,
    /// See `sync_usage`.
    pub sync_create: bool,
    /// Tables the sync user lacks full privileges on (granted schemas).
    pub sync_tables_missing: i64,
    /// Default privileges: tables the current role creates are granted to the sync user.
    pub sync_default: bool,
    /// The read role has USAGE.
    pub read_usage: bool,
    /// Tables the read role cannot SELECT.
    pub read_tables_missing: i64,
    /// Default privileges: tables the sync user creates are readable by the read role.
    pub read_default_for_sync: bool,
    /// Default privileges: tables the current role creates are readable by the read role.
    pub read_default_for_current: bool,
    /// Preset roles that lack USAGE.
    pub api_usage_missing: bool,
    /// Tables the preset's reading roles cannot SELECT.
    pub api_tables_missing: i64,
    /// The preset's reading roles' default SELECT is missing.
    pub api_default_missing: bool,
    /// Tables the preset's writing roles cannot write.
    pub api_write_tables_missing: i64,
    /// The preset's writing roles' default privileges are missing.
    pub api_write_default_missing: bool,
    /// Tables the preset's reading roles may write (from an older setup that granted `ALL`).
    pub api_readers_write_tables: i64,
    /// Default privileges that let the reading roles write tables sluice creates later.
    pub api_readers_write_default: bool,
    /// Objects owned by someone other than the sync user.
    pub foreign_objects: Vec<ForeignObject>,
}

/// The state relevant to a [`SetupSpec`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct State {
    /// `server_version_num`.
    pub version_num: i32,
    /// The role inspecting.
    pub current_user: String,
    /// The sync user exists / may log in.
    pub sync_exists: bool,
    /// See `sync_exists`.
    pub sync_can_login: bool,
    /// The sync user's CONNECT / CREATE on the database.
    pub db_connect: bool,
    /// See `db_connect`.
    pub db_create: bool,
    /// The read role exists.
    pub read_exists: bool,
    /// The sync user holds the read role with the admin option.
    pub sync_is_read_admin: bool,
    /// Per schema of the spec, in order.
    pub schemas: Vec<SchemaState>,
    /// Roles that should hold the read role but do not (readers and preset roles).
    pub read_missing_for: Vec<String>,
    /// Preset roles that do not exist.
    pub preset_roles_absent: Vec<String>,
    /// Roles named to receive the read role (`--grant-read`) that do not exist.
    pub readers_absent: Vec<String>,
    /// The inspecting session is encrypted.
    pub ssl: bool,
    /// Every role may create objects in schema `public` (PUBLIC holds CREATE there: the
    /// default before PostgreSQL 15).
    pub public_schema_open: bool,
    /// The owner of schema `public`, when the inspecting role can neither act as it nor is a
    /// superuser (so it cannot revoke what PUBLIC holds there).
    pub public_schema_owner_elsewhere: Option<String>,
    /// The inspecting role must become a member of the sync user for the steps that act as
    /// it (a schema it owns, its default privileges): it is neither a superuser nor a member.
    pub admin_needs_membership: bool,
}

/// PUBLIC (every role) may create objects in schema `public`: the default before PostgreSQL 15.
pub(crate) async fn public_schema_open(conn: &mut PgConnection) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar!(
        r#"select coalesce((select has_schema_privilege('public', n.oid, 'CREATE')
                            from pg_namespace n where n.nspname = 'public'), false) as "open!""#
    )
    .fetch_one(conn)
    .await
}

async fn role_exists(conn: &mut PgConnection, role: &str) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar!(
        r#"select exists (select 1 from pg_roles where rolname = $1) as "e!""#,
        role
    )
    .fetch_one(conn)
    .await
}

async fn member(
    conn: &mut PgConnection,
    group: &str,
    role: &str,
    admin: bool,
) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar!(
        r#"select exists (
             select 1 from pg_auth_members m
             join pg_roles g on g.oid = m.roleid join pg_roles u on u.oid = m.member
             where g.rolname = $1 and u.rolname = $2 and (m.admin_option or not $3)) as "e!""#,
        group,
        role,
        admin
    )
    .fetch_one(conn)
    .await
}

async fn schema_privilege(
    conn: &mut PgConnection,
    role: &str,
    schema: &str,
    privilege: &str,
) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar!(
        r#"select coalesce((select has_schema_privilege(r.oid, n.oid, $3) from pg_roles r, pg_namespace n
                            where r.rolname = $1 and n.nspname = $2), false) as "ok!""#,
        role,
        schema,
        privilege
    )
    .fetch_one(conn)
    .await
}

/// Tables (and views) in `schema` on which `role` lacks `privilege`.
async fn tables_missing(
    conn: &mut PgConnection,
    schema: &str,
    role: &str,
    privilege: &str,
) -> Result<i64, sqlx::Error> {
    tables_where(conn, schema, role, privilege, false).await
}

/// Tables (and views) in `schema` on which `role` holds `privilege`.
async fn tables_granted(
    conn: &mut PgConnection,
    schema: &str,
    role: &str,
    privilege: &str,
) -> Result<i64, sqlx::Error> {
    tables_where(conn, schema, role, privilege, true).await
}

/// How many tables in `schema` `role` holds (`held`) or lacks `privilege` on.
async fn tables_where(
    conn: &mut PgConnection,
    schema: &str,
    role: &str,
    privilege: &str,
    held: bool,
) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar!(
        r#"select count(*) as "n!" from pg_class c join pg_namespace n on n.oid = c.relnamespace
           where n.nspname = $1 and c.relkind in ('r', 'p', 'v', 'm', 'f')
             and coalesce((select has_table_privilege(r.oid, c.oid, $3) from pg_roles r where r.rolname = $2), false) = $4"#,
        schema,
        role,
        privilege,
        held
    )
    .fetch_one(conn)
    .await
}

/// A preset's API roles by what they may do with synced tables: (read only, read and write).
pub(crate) fn api_levels(spec: &SetupSpec) -> (Vec<&'static str>, Vec<&'static str>) {
    match spec.preset {
        None => (Vec::new(), Vec::new()),
        Some(p) if spec.api_roles_write => (Vec::new(), p.api_roles().to_vec()),
        Some(p) => (p.api_readers().to_vec(), p.api_writers().to_vec()),
    }
}

async fn default_privilege(
    conn: &mut PgConnection,
    schema: &str,
    creator: &str,
    grantee: &str,
    privilege: &str,
) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar!(
        r#"select exists (
             select 1 from pg_default_acl d
             join pg_namespace n on n.oid = d.defaclnamespace
             cross join lateral aclexplode(d.defaclacl) a
             where n.nspname = $1 and d.defaclobjtype = 'r'
               and d.defaclrole = (select oid from pg_roles where rolname = $2)
               and a.grantee = (select oid from pg_roles where rolname = $3)
               and a.privilege_type = $4) as "ok!""#,
        schema,
        creator,
        grantee,
        privilege
    )
    .fetch_one(conn)
    .await
}

/// Objects in `schema` not owned by `owner`.
pub async fn foreign_objects(
    conn: &mut PgConnection,
    schema: &str,
    owner: &str,
) -> Result<Vec<ForeignObject>, sqlx::Error> {
    let rows = sqlx::query!(
        r#"select c.relname::text as "name!", pg_get_userbyid(c.relowner)::text as "owner!",
                  case c.relkind when 'r' then 'table' when 'p' then 'table' when 'v' then 'view'
                       when 'm' then 'materialized view' when 'f' then 'foreign table' else 'sequence' end as "kind!"
           from pg_class c join pg_namespace n on n.oid = c.relnamespace
           where n.nspname = $1 and c.relkind in ('r', 'p', 'v', 'm', 'f', 'S')
             and pg_get_userbyid(c.relowner) <> $2
           order by c.relname"#,
        schema,
        owner
    )
    .fetch_all(conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| ForeignObject {
            kind: r.kind,
            name: r.name,
            owner: r.owner,
        })
        .collect())
}

/// Reads everything [`crate::plan`] needs to decide what is missing.
pub async fn inspect(conn: &mut PgConnection, spec: &SetupSpec) -> Result<State, sqlx::Error> {
    let facts = sluice_pg::catalog::server_facts(conn).await?;
    let sync = sluice_pg::catalog::role(conn, &spec.sync_user).await?;
    let db = sqlx::query!(
        r#"select coalesce((select has_database_privilege(r.oid, d.oid, 'CONNECT') from pg_roles r, pg_database d
                            where r.rolname = $1 and d.datname = $2), false) as "connect!",
                  coalesce((select has_database_privilege(r.oid, d.oid, 'CREATE') from pg_roles r, pg_database d
                            where r.rolname = $1 and d.datname = $2), false) as "create!""#,
        spec.sync_user,
        spec.database
    )
    .fetch_one(&mut *conn)
    .await?;
    let mut state = State {
        version_num: facts.version_num,
        current_user: facts.current_user.clone(),
        sync_exists: sync.is_some(),
        sync_can_login: sync.as_ref().is_some_and(|r| r.can_login),
        db_connect: db.connect,
        db_create: db.create,
        read_exists: role_exists(conn, &spec.read_role).await?,
        sync_is_read_admin: member(conn, &spec.read_role, &spec.sync_user, true).await?,
        ssl: facts.ssl,
        public_schema_open: public_schema_open(conn).await?,
        public_schema_owner_elsewhere: sqlx::query_scalar!(
            r#"select pg_get_userbyid(n.nspowner)::text as "owner!" from pg_namespace n
               where n.nspname = 'public' and not pg_has_role(n.nspowner, 'USAGE')
                 and not (select rolsuper from pg_roles where rolname = current_user)"#
        )
        .fetch_optional(&mut *conn)
        .await?,
        ..State::default()
    };
    let admin = sluice_pg::catalog::role(conn, &facts.current_user).await?;
    state.admin_needs_membership = !admin.is_some_and(|a| a.superuser)
        && facts.current_user != spec.sync_user
        && !member(conn, &spec.sync_user, &facts.current_user, false).await?;
    let api_roles: Vec<&str> = spec
        .preset
        .map(|p| p.api_roles().to_vec())
        .unwrap_or_default();
    for role in &api_roles {
        if !role_exists(conn, role).await? {
            state.preset_roles_absent.push((*role).to_owned());
        }
    }
    let mut wants_read: Vec<String> = spec.readers.clone();
    if spec.preset.is_some() {
        wants_read.push("postgres".into());
        wants_read.extend(api_roles.iter().map(|r| r.to_string()));
    }
    for role in wants_read {
        if !role_exists(conn, &role).await? {
            if spec.readers.contains(&role) {
                state.readers_absent.push(role);
            }
        } else if !member(conn, &spec.read_role, &role, false).await? {
            state.read_missing_for.push(role);
        }
    }
    for schema in &spec.schemas {
        let name = schema.name.as_str();
        let owner = sluice_pg::catalog::schema_owner(conn, name).await?;
        let mut s = SchemaState {
            exists: owner.is_some(),
            owner,
            ..SchemaState::default()
        };
        // A schema not created yet has none of the preset's grants either.
        let (readers, writers) = api_levels(spec);
        s.api_usage_missing = !api_roles.is_empty();
        s.api_default_missing = !readers.is_empty();
        s.api_write_default_missing = !writers.is_empty();
        if s.exists {
            s.api_usage_missing = false;
            s.api_default_missing = false;
            s.api_write_default_missing = false;
            s.sync_usage = schema_privilege(conn, &spec.sync_user, name, "USAGE").await?;
            s.sync_create = schema_privilege(conn, &spec.sync_user, name, "CREATE").await?;
            s.read_usage = schema_privilege(conn, &spec.read_role, name, "USAGE").await?;
            s.read_tables_missing = tables_missing(conn, name, &spec.read_role, "SELECT").await?;
            s.read_default_for_sync =
                default_privilege(conn, name, &spec.sync_user, &spec.read_role, "SELECT").await?;
            s.read_default_for_current =
                default_privilege(conn, name, &facts.current_user, &spec.read_role, "SELECT")
                    .await?;
            if schema.usage == SchemaUse::Granted {
                s.sync_tables_missing =
                    tables_missing(conn, name, &spec.sync_user, "INSERT").await?;
                s.sync_default =
                    default_privilege(conn, name, &facts.current_user, &spec.sync_user, "INSERT")
                        .await?;
            }
            for role in &api_roles {
                s.api_usage_missing |= !schema_privilege(conn, role, name, "USAGE").await?;
            }
            for role in &readers {
                s.api_tables_missing += tables_missing(conn, name, role, "SELECT").await?;
                s.api_default_missing |=
                    !default_privilege(conn, name, &spec.sync_user, role, "SELECT").await?;
                // Left over from a setup that let them write: taken back.
                s.api_readers_write_tables += tables_granted(conn, name, role, "INSERT").await?;
                s.api_readers_write_default |=
                    default_privilege(conn, name, &spec.sync_user, role, "INSERT").await?;
            }
            for role in &writers {
                s.api_write_tables_missing += tables_missing(conn, name, role, "INSERT").await?;
                s.api_write_default_missing |=
                    !default_privilege(conn, name, &spec.sync_user, role, "INSERT").await?;
            }
            s.foreign_objects = foreign_objects(conn, name, &spec.sync_user).await?;
        }
        state.schemas.push(s);
    }
    Ok(state)
}
