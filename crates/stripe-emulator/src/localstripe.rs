//! `localstripe`, a third-party Stripe emulator (PyPI), started and stopped by the test kit,
//! so the Stripe provider is checked against an implementation nobody here wrote.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running `localstripe --from-scratch` on a free loopback port; killed when dropped.
pub struct LocalStripe {
    child: Child,
    port: u16,
}

impl LocalStripe {
    /// Where the `localstripe` program is: `$SLUICE_LOCALSTRIPE`, else the virtual
    /// environment `.ci/run` makes (`target/venv/bin/localstripe`), else `PATH`.
    pub fn program() -> Option<PathBuf> {
        if let Some(p) = std::env::var_os("SLUICE_LOCALSTRIPE") {
            return Some(PathBuf::from(p));
        }
        let venv =
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/venv/bin/localstripe");
        if venv.exists() {
            return Some(venv);
        }
        std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join("localstripe"))
                .find(|p| p.exists())
        })
    }

    /// Starts it and waits until it answers.
    ///
    /// # Panics
    /// When `localstripe` is not installed (with how to install it), or does not answer.
    pub fn start() -> LocalStripe {
        let program = Self::program().unwrap_or_else(|| {
            panic!(
                "localstripe is not installed; `.ci/run` installs it, or: python3 -m venv target/venv && target/venv/bin/pip install localstripe"
            )
        });
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port");
        let child = Command::new(&program)
            .args(["--port", &port.to_string(), "--from-scratch"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", program.display()));
        let running = LocalStripe { child, port };
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "localstripe did not listen on port {port} within 30 s"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        running
    }

    /// The base URL.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for LocalStripe {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
