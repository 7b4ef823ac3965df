//! Entities created through the management API (or the console), kept beside the config file.
//!
//! `sluice.toml` stays the source of truth for what it declares: the API never writes to it,
//! and refuses (`409`, naming the file) to create, change or delete an entity the file
//! declares. What the API creates is kept in `<data_dir>/managed.toml`, in the same format as
//! `sluice.toml` (so an entity can be moved into the file by cutting and pasting it), and
//! added to the file's entities whenever the config is loaded. A name declared in both is a
//! conflict that stops the config from being applied, never a silent override.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::load::{ConfigError, line_column};
use crate::problems::Problem;
use crate::{Config, ConsumerConfig, SyncConfig, TargetConfig};

/// The managed entities' file name, inside the data directory.
pub const MANAGED_FILE: &str = "managed.toml";

/// Targets, syncs and consumers created through the API.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Managed {
    /// Targets.
    #[serde(default, rename = "target", skip_serializing_if = "Vec::is_empty")]
    pub targets: Vec<TargetConfig>,
    /// Syncs.
    #[serde(default, rename = "sync", skip_serializing_if = "Vec::is_empty")]
    pub syncs: Vec<SyncConfig>,
    /// Consumers.
    #[serde(default, rename = "consumer", skip_serializing_if = "Vec::is_empty")]
    pub consumers: Vec<ConsumerConfig>,
}

/// The kinds of entity the API manages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ManagedKind {
    /// `[[target]]`.
    Target,
    /// `[[sync]]`.
    Sync,
    /// `[[consumer]]`.
    Consumer,
}

impl ManagedKind {
    /// `target`, `sync`, `consumer`.
    pub fn name(self) -> &'static str {
        match self {
            ManagedKind::Target => "target",
            ManagedKind::Sync => "sync",
            ManagedKind::Consumer => "consumer",
        }
    }
}

impl Config {
    /// The config that runs: the file at `path` and the entities created through the API
    /// (`<data_dir>/managed.toml`). A name both declare is an error naming the file, never
    /// a silent override. Errors are printed as `file:line:column: …` with their fix.
    pub fn load_running(path: &Path) -> Result<Config, String> {
        let file = Config::load(path).map_err(|e| e.to_string())?;
        let managed = Managed::load(&file.data_dir).map_err(|e| e.to_string())?;
        let conflicts = managed.conflicts(&file, &path.display().to_string());
        if !conflicts.is_empty() {
            let all: Vec<String> = conflicts.iter().map(|p| p.to_string()).collect();
            return Err(all.join("\nerror: "));
        }
        Ok(managed.merged(&file))
    }
}

impl Managed {
    /// The file the managed entities of `data_dir` live in.
    pub fn path(data_dir: &Path) -> PathBuf {
        data_dir.join(MANAGED_FILE)
    }

    /// Reads the managed entities of `data_dir`; none when the file does not exist.
    pub fn load(data_dir: &Path) -> Result<Managed, ConfigError> {
        let path = Managed::path(data_dir);
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Managed::default()),
            Err(e) => {
                return Err(ConfigError {
                    file: path.display().to_string(),
                    line: None,
                    column: None,
                    message: format!("cannot read it: {e}"),
                    fix: "give sluice read and write access to its data directory".into(),
                });
            }
        };
        toml::from_str(&text).map_err(|e| {
            let (line, column) = e
                .span()
                .map(|s| line_column(&text, s.start))
                .map_or((None, None), |(l, c)| (Some(l), Some(c)));
            ConfigError {
                file: path.display().to_string(),
                line,
                column,
                message: e.message().trim().to_owned(),
                fix: "this file is written by sluice's API; correct it by hand, or change the entities through the API".into(),
            }
        })
    }

    /// Writes the managed entities of `data_dir` (atomically: a reader sees the old file or
    /// the new one, never half of one).
    pub fn save(&self, data_dir: &Path) -> std::io::Result<()> {
        std::fs::create_dir_all(data_dir)?;
        let body = toml::to_string(self).map_err(std::io::Error::other)?;
        let text = format!(
            "# Targets, syncs and consumers created through sluice's API or console.\n\
             # Written by sluice; the same format as sluice.toml, so an entity can be moved\n\
             # there (then delete it through the API). Never holds a password itself.\n\n{body}"
        );
        let path = Managed::path(data_dir);
        let partial = path.with_extension("toml.partial");
        std::fs::write(&partial, text)?;
        std::fs::rename(&partial, &path)
    }

    /// Whether an entity of `kind` named `name` is here.
    pub fn has(&self, kind: ManagedKind, name: &str) -> bool {
        match kind {
            ManagedKind::Target => self.targets.iter().any(|t| t.name == name),
            ManagedKind::Sync => self.syncs.iter().any(|s| s.name == name),
            ManagedKind::Consumer => self.consumers.iter().any(|c| c.name.0 == name),
        }
    }

    /// Removes the entity of `kind` named `name`; whether it was here.
    pub fn remove(&mut self, kind: ManagedKind, name: &str) -> bool {
        let before = self.len();
        match kind {
            ManagedKind::Target => self.targets.retain(|t| t.name != name),
            ManagedKind::Sync => self.syncs.retain(|s| s.name != name),
            ManagedKind::Consumer => self.consumers.retain(|c| c.name.0 != name),
        }
        self.len() != before
    }

    fn len(&self) -> usize {
        self.targets.len() + self.syncs.len() + self.consumers.len()
    }

    /// Names declared both in `file` (the config file, at `file_name`) and here.
    pub fn conflicts(&self, file: &Config, file_name: &str) -> Vec<Problem> {
        let mut out = Vec::new();
        let mut conflict = |kind: ManagedKind, name: &str| {
            out.push(Problem {
                message: format!(
                    "{} {name:?} is declared in {file_name} and was also created through the API (kept in {MANAGED_FILE} in the data directory); the file's would silently replace it",
                    kind.name()
                ),
                fix: format!(
                    "rename the one in {file_name}, or delete the API's: DELETE /v1/{}s/{name}",
                    kind.name()
                ),
            });
        };
        for t in self
            .targets
            .iter()
            .filter(|t| file.targets.iter().any(|f| f.name == t.name))
        {
            conflict(ManagedKind::Target, &t.name);
        }
        for s in self
            .syncs
            .iter()
            .filter(|s| file.syncs.iter().any(|f| f.name == s.name))
        {
            conflict(ManagedKind::Sync, &s.name);
        }
        for c in self
            .consumers
            .iter()
            .filter(|c| file.consumers.iter().any(|f| f.name == c.name))
        {
            conflict(ManagedKind::Consumer, &c.name.0);
        }
        out
    }

    /// The config that runs: the file's entities, then these.
    pub fn merged(&self, file: &Config) -> Config {
        let mut config = file.clone();
        config.targets.extend(self.targets.iter().cloned());
        config.syncs.extend(self.syncs.iter().cloned());
        config.consumers.extend(self.consumers.iter().cloned());
        config
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"
[[target]]
name = "warehouse"
[target.connection]
host = "db"
database = "app"
user = "sluice"
"#;

    #[test]
    fn managed_entities_round_trip_and_join_the_file_and_a_shared_name_is_a_conflict() {
        let file = Config::parse(FILE, "sluice.toml", |_| None).unwrap();
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(Managed::load(dir.path()).unwrap(), Managed::default());
        let mut managed = Managed::default();
        let mut other = file.targets[0].clone();
        other.name = "reports".into();
        managed.targets.push(other);
        managed.save(dir.path()).unwrap();
        let loaded = Managed::load(dir.path()).unwrap();
        assert_eq!(loaded, managed);
        // The saved file is itself a valid sluice.toml.
        let text = std::fs::read_to_string(Managed::path(dir.path())).unwrap();
        let as_config = Config::parse(&text, "managed.toml", |_| None).unwrap();
        assert_eq!(as_config.targets[0].name, "reports");

        let merged = loaded.merged(&file);
        assert_eq!(merged.targets.len(), 2);
        assert!(loaded.conflicts(&file, "sluice.toml").is_empty());

        let mut clash = loaded.clone();
        clash.targets.push(file.targets[0].clone());
        let problems = clash.conflicts(&file, "/etc/sluice.toml");
        assert_eq!(problems.len(), 1);
        assert!(
            problems[0]
                .message
                .contains("target \"warehouse\" is declared in /etc/sluice.toml"),
            "{}",
            problems[0]
        );
        assert!(
            problems[0].fix.contains("DELETE /v1/targets/warehouse"),
            "{}",
            problems[0]
        );
        assert!(clash.remove(ManagedKind::Target, "warehouse"));
        assert!(!clash.remove(ManagedKind::Target, "warehouse"));
    }

    #[test]
    fn a_damaged_file_is_located() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(Managed::path(dir.path()), "[[target]]\nname = 3\n").unwrap();
        let err = Managed::load(dir.path()).unwrap_err();
        assert_eq!(err.line, Some(2), "{err}");
    }
}
