//! A real OpenSSH server on a free loopback port, for tests (included with `#[path]` by the
//! tunnel tests and the CLI's tests).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn sshd_binary() -> Option<PathBuf> {
    ["/usr/sbin/sshd", "/usr/bin/sshd"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// An OpenSSH server on a free loopback port, with its own host key and authorized_keys file.
pub struct Sshd {
    child: Child,
    pub port: u16,
    pub host_key: PathBuf,
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A new ed25519 host key in `dir`; returns its path.
pub fn new_host_key(dir: &Path) -> PathBuf {
    let host_key = dir.join(format!("host_key_{}", free_port()));
    let status = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&host_key)
        .status()
        .unwrap();
    assert!(status.success());
    host_key
}

/// The `SHA256:…` fingerprint of the host key at `path`.
pub fn host_key_fingerprint(path: &Path) -> String {
    let line = std::fs::read_to_string(path.with_extension("pub")).unwrap();
    sluice_tunnel::keys::fingerprint(&sluice_tunnel::keys::parse_public(&line).unwrap())
}

impl Sshd {
    pub fn start(dir: &Path, authorized_keys: &str) -> Sshd {
        Self::start_with(dir, authorized_keys, free_port(), new_host_key(dir))
    }

    /// An sshd on `port` with `host_key` (to bring up a bastion a config already names).
    pub fn start_with(dir: &Path, authorized_keys: &str, port: u16, host_key: PathBuf) -> Sshd {
        let sshd = sshd_binary().expect("openssh-server is installed (.ci/run installs it)");
        let _ = std::fs::create_dir_all("/run/sshd");
        let keys = dir.join("authorized_keys");
        std::fs::write(&keys, format!("{authorized_keys}\n")).unwrap();
        let child = Command::new(sshd)
            .args(["-D", "-e", "-f", "/dev/null"])
            .args(["-o", &format!("ListenAddress=127.0.0.1:{port}")])
            .args(["-o", &format!("HostKey={}", host_key.display())])
            .args(["-o", &format!("AuthorizedKeysFile={}", keys.display())])
            .args([
                "-o",
                "StrictModes=no",
                "-o",
                "UsePAM=no",
                "-o",
                "PasswordAuthentication=no",
                "-o",
                "PidFile=none",
            ])
            .args([
                "-o",
                "PermitRootLogin=prohibit-password",
                "-o",
                "AllowTcpForwarding=yes",
                "-o",
                "LogLevel=ERROR",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "sshd did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Sshd {
            child,
            port,
            host_key,
        }
    }

    pub fn fingerprint(&self) -> String {
        host_key_fingerprint(&self.host_key)
    }
}

pub fn whoami() -> String {
    String::from_utf8(Command::new("id").arg("-un").output().unwrap().stdout)
        .unwrap()
        .trim()
        .to_owned()
}
