//! Finding PostgreSQL server binaries, and the OS user that runs them.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{Error, versions};

/// Where the server binaries live, and their version.
#[derive(Clone, Debug)]
pub struct Binaries {
    dir: PathBuf,
    version: String,
    /// The shared libraries of a packaged release (`LD_LIBRARY_PATH` for its tools).
    lib: Option<PathBuf>,
}

impl Binaries {
    /// Finds the server binaries:
    /// 1. the `SLUICE_PG_BIN` directory, when set;
    /// 2. with `SLUICE_PG_VERSION=N`, the machine's own major version N if it has one, else
    ///    the pinned release N ([`crate::RELEASES`], fetched with npm once);
    /// 3. otherwise `pg_config --bindir`, a directory on `PATH` holding `initdb`, the newest
    ///    `/usr/lib/postgresql/*/bin`, and last the pinned fallback release when `npm` exists.
    pub fn find() -> Result<Self, Error> {
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
        if let Some(major) = versions::requested_major()? {
            return Self::of_major(major);
        }
        let mut searched = vec!["SLUICE_PG_BIN (unset)".to_owned()];
        if let Some(dir) = installed(&mut searched)?.into_iter().next() {
            return Self::at(dir);
        }
        if has_npm() {
            return versions::release(versions::FALLBACK_MAJOR)?.binaries();
        }
        searched.push(format!("npm (not on PATH, for {})", versions::NPM_PACKAGE));
        Err(Error::NoBinaries {
            searched: searched.join(", "),
        })
    }

    /// The pinned release of `major` (fetched with npm once), or the machine's own binaries
    /// when they are that major version.
    pub fn of_major(major: u32) -> Result<Self, Error> {
        let release = versions::release(major)?;
        for dir in installed(&mut Vec::new())? {
            let found = Self::at(dir)?;
            if found.major() == Some(major) {
                return Ok(found);
            }
        }
        release.binaries()
    }

    /// Binaries in `dir` (which must hold `initdb`, `pg_ctl` and `postgres`).
    pub fn at(dir: PathBuf) -> Result<Self, Error> {
        // A packaged release: bin/, lib/ and the package's list of library links side by side.
        let lib = dir
            .parent()
            .filter(|native| native.join("pg-symlinks.json").exists())
            .map(|native| native.join("lib"));
        let mut binaries = Self {
            dir,
            version: String::new(),
            lib,
        };
        let out = binaries
            .command(&OsUser::current(), "postgres")
            .arg("--version")
            .output()
            .map_err(|e| {
                Error::io(
                    format!("running {}/postgres --version", binaries.dir.display()),
                    e,
                )
            })?;
        binaries.version = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        if !out.status.success() || binaries.version.is_empty() {
            return Err(Error::Command {
                what: format!("{}/postgres --version", binaries.dir.display()),
                status: out.status.to_string(),
                output: String::from_utf8_lossy(&out.stderr).into_owned(),
            });
        }
        Ok(binaries)
    }

    /// A command running one of the tools as `user`, with the libraries it needs.
    pub fn command(&self, user: &OsUser, tool: &str) -> Command {
        let mut cmd = user.command(self.tool(tool));
        self.add_libraries(&mut cmd);
        cmd
    }

    /// Lets `cmd` (and what it starts) load a packaged release's libraries.
    pub fn add_libraries(&self, cmd: &mut Command) {
        if let Some(lib) = &self.lib {
            cmd.env("LD_LIBRARY_PATH", lib);
        }
    }

    /// The directory holding the binaries.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `postgres --version` output, e.g. `postgres (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)`.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// The release, e.g. `15.18`, read from [`version`](Self::version).
    pub fn release(&self) -> Option<&str> {
        self.version.split_whitespace().nth(2)
    }

    /// The major version, e.g. `15`, read from [`version`](Self::version).
    pub fn major(&self) -> Option<u32> {
        self.release()?
            .split(|c: char| !c.is_ascii_digit())
            .next()?
            .parse()
            .ok()
    }

    /// The path of one binary.
    pub fn tool(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// `psql`, next to the server binaries or on `PATH` (any version speaks to any server).
    pub fn psql(&self) -> PathBuf {
        let here = self.dir.join("psql");
        if here.exists() {
            here
        } else {
            PathBuf::from("psql")
        }
    }
}

/// The machine's own server binary directories, in order of preference; none when
/// `SLUICE_PG_FROM=npm` asks for the pinned releases only.
fn installed(searched: &mut Vec<String>) -> Result<Vec<PathBuf>, Error> {
    match std::env::var("SLUICE_PG_FROM").as_deref() {
        Err(_) | Ok("") | Ok("any") => {}
        Ok("npm") => {
            searched.push("SLUICE_PG_FROM=npm (the machine's own binaries are not used)".into());
            return Ok(Vec::new());
        }
        Ok(other) => {
            return Err(Error::NoBinaries {
                searched: format!("SLUICE_PG_FROM={other:?} (expected npm or any)"),
            });
        }
    }
    let mut found = Vec::new();
    match Command::new("pg_config").arg("--bindir").output() {
        Ok(out) if out.status.success() => {
            let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
            if has_initdb(&dir) {
                found.push(dir);
            } else {
                searched.push(format!("pg_config --bindir ({})", dir.display()));
            }
        }
        _ => searched.push("pg_config --bindir (not available)".to_owned()),
    }
    match std::env::var_os("PATH")
        .and_then(|path| std::env::split_paths(&path).find(|d| has_initdb(d)))
    {
        Some(dir) => found.push(dir),
        None => searched.push("PATH".to_owned()),
    }
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
    if versioned.is_empty() {
        searched.push("/usr/lib/postgresql/*/bin".to_owned());
    }
    found.extend(versioned.into_iter().rev().map(|(_, dir)| dir));
    // The same directory is often reached twice (PATH holds links into /usr/lib/postgresql).
    let mut unique: Vec<PathBuf> = Vec::new();
    for dir in found {
        let real = std::fs::canonicalize(&dir).unwrap_or(dir);
        if !unique.contains(&real) {
            unique.push(real);
        }
    }
    Ok(unique)
}

fn has_npm() -> bool {
    Command::new("npm")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
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
            return Ok(Self::current());
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

    /// The current process's user.
    pub fn current() -> Self {
        let me = std::fs::metadata("/proc/self");
        Self {
            name: "(current user)".into(),
            uid: me.as_ref().map_or(0, |m| m.uid()),
            gid: me.as_ref().map_or(0, |m| m.gid()),
            switch: false,
        }
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
