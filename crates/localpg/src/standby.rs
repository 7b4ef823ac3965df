//! Streaming physical standbys of a local cluster, and promoting them: for tests of sources
//! that read a standby, and of failover.
//!
//! The standby is made from an online base backup taken through SQL (`pg_backup_start` /
//! `pg_backup_stop`, or their pre-15 names), with a physical replication slot on the primary
//! so that no WAL it needs is removed, and it streams from the primary over its Unix socket.

use super::*;

/// How to start a standby; see [`Cluster::standby`].
#[derive(Clone, Debug)]
pub struct StandbyOptions {
    hot_standby_feedback: bool,
    settings: Vec<(String, String)>,
}

impl Default for StandbyOptions {
    fn default() -> Self {
        Self {
            hot_standby_feedback: true,
            settings: Vec::new(),
        }
    }
}

impl StandbyOptions {
    /// `hot_standby_feedback` (on by default: logical decoding on a standby needs it).
    pub fn hot_standby_feedback(mut self, on: bool) -> Self {
        self.hot_standby_feedback = on;
        self
    }

    /// A `postgresql.conf` setting of the standby, written as given.
    pub fn setting(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.settings.push((name.into(), value.into()));
        self
    }
}

/// Standbys made so far in this process, for unique slot names.
static STANDBYS: AtomicU32 = AtomicU32::new(0);

impl Cluster {
    /// Starts a streaming standby of this cluster (which must not require TLS) and returns it
    /// once it accepts connections. It streams through the physical slot
    /// [`Cluster::standby_slot`] names, created here on the primary.
    pub async fn standby(&self, options: StandbyOptions) -> Result<Cluster, Error> {
        if matches!(self.tls, Tls::Required | Tls::ClientCertRequired) {
            return Err(Error::Command {
                what: "starting a standby".into(),
                status: "unsupported".into(),
                output: "standbys are made of clusters that do not require TLS".into(),
            });
        }
        let n = STANDBYS.fetch_add(1, Ordering::Relaxed) + 1;
        let slot = format!("standby_{}_{n}", std::process::id());
        let root = tempfile::Builder::new()
            .prefix("sluice-pg-standby-")
            .tempdir()
            .map_err(|e| Error::io("creating a temporary directory", e))?
            .keep();
        set_mode(&root, 0o700)?;
        self.user.own(&root)?;
        let supervisor = spawn_supervisor(&self.binaries, &self.user, &root)?;
        let standby = Cluster {
            binaries: self.binaries.clone(),
            user: self.user.clone(),
            root,
            port: free_port()?,
            tls: self.tls,
            // The catalog, the superuser's password included, is the primary's.
            password: self.password.clone(),
            authority: None,
            superuser_cert: None,
            supervisor: Mutex::new(Some(supervisor)),
            databases: AtomicU32::new(0),
        };

        let mut conn = self.admin("postgres").await?;
        sqlx::query("select pg_create_physical_replication_slot($1, true)")
            .bind(&slot)
            .execute(&mut conn)
            .await?;
        let modern = self.binaries.major() >= Some(15);
        let start = if modern {
            "select pg_backup_start('sluice standby', true)::text"
        } else {
            "select pg_start_backup('sluice standby', true, false)::text"
        };
        sqlx::query(start).execute(&mut conn).await?;
        let copied = self.copy_data_dir(&standby.data_dir());
        let stop = if modern {
            "select labelfile from pg_backup_stop(false)"
        } else {
            "select labelfile from pg_stop_backup(false, false)"
        };
        let label: String = sqlx::query_scalar(stop).fetch_one(&mut conn).await?;
        copied?;
        standby.write_server_file("backup_label", &label)?;
        standby.write_server_file("standby.signal", "")?;

        let conninfo = format!(
            "host={} port={} user={SUPERUSER} dbname=postgres application_name={slot}",
            self.socket_dir().display(),
            self.port
        );
        let mut conf = read(&standby.data_dir().join("postgresql.conf"))?;
        conf.push_str(&format!(
            "\n# added by sluice-localpg for the standby\n\
             port = {port}\n\
             unix_socket_directories = {socket}\n\
             primary_conninfo = {conninfo}\n\
             primary_slot_name = {slot_literal}\n\
             hot_standby = on\n\
             hot_standby_feedback = {feedback}\n",
            port = standby.port,
            socket = quote_literal(&standby.socket_dir().display().to_string()),
            conninfo = quote_literal(&conninfo),
            slot_literal = quote_literal(&slot),
            feedback = if options.hot_standby_feedback {
                "on"
            } else {
                "off"
            },
        ));
        for (name, value) in &options.settings {
            conf.push_str(&format!("{name} = {value}\n"));
        }
        standby.write_server_file("postgresql.conf", &conf)?;
        standby.start()?;
        Ok(standby)
    }

    /// The name of the physical slot a standby made by [`Cluster::standby`] streams through
    /// (read from the standby's settings).
    pub async fn standby_slot(&self) -> Result<String, Error> {
        let mut conn = self.admin("postgres").await?;
        Ok(
            sqlx::query_scalar("select current_setting('primary_slot_name')")
                .fetch_one(&mut conn)
                .await?,
        )
    }

    /// Promotes a standby to a primary; returns once it accepts writes.
    pub fn promote(&self) -> Result<(), Error> {
        run(
            self.binaries
                .command(&self.user, "pg_ctl")
                .arg("-D")
                .arg(self.data_dir())
                .args(["-w", "-t", "60", "promote"])
                .current_dir(&self.root),
            "pg_ctl promote",
        )
        .map(drop)
        .map_err(|e| self.with_log(e))
    }

    /// Copies the data directory of this running server (inside a backup) to `to`, without
    /// what must not travel: the server's lock file and its replication slots.
    fn copy_data_dir(&self, to: &Path) -> Result<(), Error> {
        let out = self
            .user
            .command("cp")
            .arg("-a")
            .arg(self.data_dir())
            .arg(to)
            .current_dir(&self.root)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| Error::io("copying the data directory", e))?;
        // Files a running server removes while they are copied (temporary statistics, for
        // one) are not needed: the backup's WAL brings back everything that matters.
        let stderr = String::from_utf8_lossy(&out.stderr);
        let vanished = stderr
            .lines()
            .all(|line| line.contains("No such file or directory"));
        if !out.status.success() && !vanished {
            return Err(Error::Command {
                what: "copying the data directory".into(),
                status: out.status.to_string(),
                output: stderr.into_owned(),
            });
        }
        for leftover in ["postmaster.pid", "postmaster.opts"] {
            let _ = std::fs::remove_file(to.join(leftover));
        }
        if let Ok(slots) = std::fs::read_dir(to.join("pg_replslot")) {
            for slot in slots.flatten() {
                let _ = std::fs::remove_dir_all(slot.path());
            }
        }
        Ok(())
    }
}
