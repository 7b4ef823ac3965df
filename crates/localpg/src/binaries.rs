//! Finding PostgreSQL server binaries, and the OS user that runs them.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::Error;

/// Where the server binaries live, and their version.
#[derive(Clone, Debug)]
pub struct Binaries {
    dir: PathBuf,
    version: String,
}

impl Binaries {
    /// Finds the server binaries, in this order: the `SLUICE_PG_BIN` directory,
    /// `pg_config --bindir`, a directory on `PATH` holding `initdb`, then the newest
    /// `/usr/lib/postgresql/*/bin`. The first place named that holds `initdb` wins.
    pub fn find() -> Result<Self, Error> {
        let mut searched = Vec::new();
        if let Some(dir) = std::env::var_os("SLUICE_PG_BIN") {
            let dir = PathBuf::from(dir);
            if has_initdb(&dir) {
                return Self::at(dir);
            }
            // An explicit setting that is wrong is an error, not a reason to look elsewhere.
            return Err(Error::NoBinaries {
                searched: format!("SLUICE_PG_BIN={} (no initdb there)", dir.display()),
            });
        }
        searched.push("SLUICE_PG_BIN (unset)".to_owned());

        match Command::new("pg_config").arg("--bindir").output() {
            Ok(out) if out.status.success() => {
                let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
                if has_initdb(&dir) {
                    return Self::at(dir);
                }
                searched.push(format!("pg_config --bindir ({})", dir.display()));
            }
            _ => searched.push("pg_config --bindir (not available)".to_owned()),
        }

        if let Some(path) = std::env::var_os("PATH")
            && let Some(dir) = std::env::split_paths(&path).find(|d| has_initdb(d))
        {
            return Self::at(dir);
        }
        searched.push("PATH".to_owned());

        let mut versioned: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|entry| {
                let major = entry.file_name().to_str()?.parse::<u32>().ok()?;
                let bin = entry.path().join("bin");
                has_initdb(&bin).then_some((major, bin))
            })
            .collect();
        versioned.sort();
        if let Some((_, dir)) = versioned.pop() {
            return Self::at(dir);
        }
        searched.push("/usr/lib/postgresql/*/bin".to_owned());
        Err(Error::NoBinaries {
            searched: searched.join(", "),
        })
    }

    /// Binaries in `dir` (which must hold `initdb`, `pg_ctl` and `postgres`).
    pub fn at(dir: PathBuf) -> Result<Self, Error> {
        let out = Command::new(dir.join("postgres"))
            .arg("--version")
            .output()
            .map_err(|e| Error::io(format!("running {}/postgres --version", dir.display()), e))?;
        let version = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        Ok(Self { dir, version })
    }

    /// The directory holding the binaries.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `postgres --version` output, e.g. `postgres (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)`.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// The path of one binary.
    pub fn tool(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// `psql`, next to the server binaries or on `PATH`.
    pub fn psql(&self) -> PathBuf {
        let here = self.dir.join("psql");
        if here.exists() {
            here
        } else {
            PathBuf::from("psql")
        }
    }
}

fn has_initdb(dir: &Path) -> bool {
    dir.join("initdb").is_file()
}

/// The OS user that owns a cluster's files and runs its server.
///
/// `initdb` and `postgres` refuse to run as root, so a process running as root hands them
/// to an unprivileged user: `SLUICE_PG_OS_USER` if set, else `postgres` if it exists, else
/// `nobody`. Any other process runs them as itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OsUser {
    /// User name (for messages).
    pub name: String,
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// True when this is not the current user (commands must switch to it).
    pub switch: bool,
}

impl OsUser {
    /// The user to run the server as, from the current process's privileges.
    pub fn for_server() -> Result<Self, Error> {
        let me = std::fs::metadata("/proc/self").map_err(|e| Error::io("reading /proc/self", e))?;
        if me.uid() != 0 {
            return Ok(Self {
                name: "(current user)".into(),
                uid: me.uid(),
                gid: me.gid(),
                switch: false,
            });
        }
        let passwd = std::fs::read_to_string("/etc/passwd")
            .map_err(|e| Error::io("reading /etc/passwd", e))?;
        let wanted = std::env::var("SLUICE_PG_OS_USER").ok();
        let candidates: Vec<&str> = match &wanted {
            Some(name) => vec![name.as_str()],
            None => vec!["postgres", "nobody"],
        };
        for name in candidates {
            let found = passwd.lines().find_map(|line| {
                let fields: Vec<&str> = line.split(':').collect();
                (fields.len() >= 4 && fields[0] == name)
                    .then(|| Some((fields[2].parse().ok()?, fields[3].parse().ok()?)))
                    .flatten()
            });
            if let Some((uid, gid)) = found {
                return Ok(Self {
                    name: name.to_owned(),
                    uid,
                    gid,
                    switch: true,
                });
            }
        }
        Err(Error::NoOsUser {
            tried: wanted.unwrap_or_else(|| "postgres, nobody".into()),
        })
    }

    /// A command that runs as this user.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new(program);
        if self.switch {
            use std::os::unix::process::CommandExt;
            cmd.uid(self.uid).gid(self.gid);
        }
        cmd.env("LC_ALL", "C");
        cmd
    }

    /// Gives `path` to this user (a no-op when it is the current user).
    pub fn own(&self, path: &Path) -> Result<(), Error> {
        if self.switch {
            std::os::unix::fs::chown(path, Some(self.uid), Some(self.gid))
                .map_err(|e| Error::io(format!("chown {} to {}", path.display(), self.name), e))?;
        }
        Ok(())
    }
}
