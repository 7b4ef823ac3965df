//! What a target should look like once set up.

use secrecy::SecretString;
use serde::Serialize;

/// How sluice uses a schema.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SchemaUse {
    /// A sync schema (schema-mirror layout): created and owned by the sync user.
    Owned,
    /// A schema the user created (consumer-table layout, or an existing schema the user opted
    /// into): the sync user gets `usage, create` and privileges on its tables.
    Granted,
}

/// A schema sluice writes into.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SchemaSpec {
    /// The schema's name.
    pub name: String,
    /// How sluice uses it.
    pub usage: SchemaUse,
}

/// Hosted-database presets: providers whose roles and privileges differ from plain PostgreSQL.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Preset {
    /// Supabase: the data API's roles get usage and table privileges (and default privileges)
    /// on sluice's schemas: `anon` and `authenticated` read, `service_role` reads and writes;
    /// the read role goes to them and `postgres`; TLS is required.
    Supabase,
}

impl Preset {
    /// Every role the preset grants to.
    pub fn api_roles(self) -> &'static [&'static str] {
        match self {
            Preset::Supabase => &["anon", "authenticated", "service_role"],
        }
    }

    /// The roles that only read synced data through the provider's API (anyone holding the
    /// public key acts as `anon`): writes to synced tables go through sluice's write-back
    /// proxy, or would be overwritten by the next sync.
    pub fn api_readers(self) -> &'static [&'static str] {
        match self {
            Preset::Supabase => &["anon", "authenticated"],
        }
    }

    /// The roles that may also write (server-side keys).
    pub fn api_writers(self) -> &'static [&'static str] {
        match self {
            Preset::Supabase => &["service_role"],
        }
    }
}

/// The desired state of a target.
#[derive(Clone, Debug)]
pub struct SetupSpec {
    /// The database sluice writes into.
    pub database: String,
    /// The role sluice logs in as (default `sluice`).
    pub sync_user: String,
    /// The sync user's password when it is created; generated when `None`.
    pub sync_password: Option<SecretString>,
    /// The read role (default `sluice_read`).
    pub read_role: String,
    /// Schemas sluice writes into.
    pub schemas: Vec<SchemaSpec>,
    /// A hosted-database preset.
    pub preset: Option<Preset>,
    /// Existing roles to grant the read role to.
    pub readers: Vec<String>,
    /// With a preset: let every API role write synced tables (`ALL`), as older setups did,
    /// instead of only the writer roles. Anyone holding the public API key could then change
    /// or delete synced rows.
    pub api_roles_write: bool,
}

impl SetupSpec {
    /// The defaults: sync user `sluice`, read role `sluice_read`, no schemas yet.
    pub fn new(database: impl Into<String>) -> Self {
        Self {
            database: database.into(),
            sync_user: "sluice".into(),
            sync_password: None,
            read_role: "sluice_read".into(),
            schemas: Vec::new(),
            preset: None,
            readers: Vec::new(),
            api_roles_write: false,
        }
    }

    /// The legacy naming: `sluice_<suffix>` and `sluice_read_<suffix>` with one random suffix.
    pub fn legacy_names(mut self) -> Self {
        let suffix: String = uuid::Uuid::new_v4()
            .simple()
            .to_string()
            .chars()
            .take(8)
            .collect();
        self.sync_user = format!("sluice_{suffix}");
        self.read_role = format!("sluice_read_{suffix}");
        self
    }

    /// Adds a schema.
    pub fn schema(mut self, name: impl Into<String>, usage: SchemaUse) -> Self {
        self.schemas.push(SchemaSpec {
            name: name.into(),
            usage,
        });
        self
    }
}

/// A new strong password: 256 random bits as 64 hex characters.
pub fn generate_password() -> SecretString {
    let a = uuid::Uuid::new_v4().simple().to_string();
    let b = uuid::Uuid::new_v4().simple().to_string();
    SecretString::from(format!("{a}{b}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;

    #[test]
    fn legacy_names_share_one_random_suffix() {
        let spec = SetupSpec::new("app").legacy_names();
        let suffix = spec.sync_user.strip_prefix("sluice_").unwrap();
        assert_eq!(suffix.len(), 8);
        assert_eq!(spec.read_role, format!("sluice_read_{suffix}"));
        assert_ne!(
            SetupSpec::new("app").legacy_names().sync_user,
            spec.sync_user
        );
    }

    #[test]
    fn generated_passwords_are_long_and_distinct() {
        let (a, b) = (generate_password(), generate_password());
        assert_eq!(a.expose_secret().len(), 64);
        assert_ne!(a.expose_secret(), b.expose_secret());
        assert!(!format!("{a:?}").contains(a.expose_secret()));
    }
}
