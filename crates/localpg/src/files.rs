//! The files of a cluster's data directory: the `initdb` template it is copied from, `pg_hba.conf`
//! rules for the chosen TLS and authentication, the TLS certificates, and `postgresql.conf`
//! settings.

use super::*;

impl Cluster {
    /// The data directory is copied from a per-version template made by `initdb` once
    /// (about 0.1 s instead of 0.6 s per cluster).
    pub(crate) fn init_data_dir(&self) -> Result<(), Error> {
        let template = self.template_dir()?;
        let data = self.data_dir();
        run(
            self.user
                .command("cp")
                .arg("-a")
                .arg(&template)
                .arg(&data)
                .current_dir(&self.root),
            "copying the initdb template",
        )?;
        Ok(())
    }

    pub(crate) fn template_dir(&self) -> Result<PathBuf, Error> {
        use std::hash::{Hash, Hasher};
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        (
            TEMPLATE_REVISION,
            self.binaries.dir(),
            self.binaries.version(),
        )
            .hash(&mut hasher);
        let template = std::env::temp_dir().join(format!(
            "sluice-localpg-template-{}-{:016x}",
            self.user.uid,
            hasher.finish()
        ));
        if template.join("PG_VERSION").exists() {
            return Ok(template);
        }
        // Build beside it and rename into place, so concurrent test processes never see a
        // half-made template.
        let partial = std::env::temp_dir().join(format!(
            "sluice-localpg-template-partial-{}-{}",
            std::process::id(),
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir(&partial)
            .map_err(|e| Error::io(format!("creating {}", partial.display()), e))?;
        set_mode(&partial, 0o700)?;
        self.user.own(&partial)?;
        let initdb = run(
            self.binaries
                .command(&self.user, "initdb")
                .arg("-D")
                .arg(&partial)
                .args([
                    "-U",
                    SUPERUSER,
                    "--auth=trust",
                    "--no-sync",
                    "-E",
                    "UTF8",
                    "--locale=C",
                ])
                .current_dir(std::env::temp_dir()),
            "initdb",
        );
        if let Err(e) = initdb {
            let _ = std::fs::remove_dir_all(&partial);
            return Err(e);
        }
        if std::fs::rename(&partial, &template).is_err() {
            // Someone else finished first; theirs is as good as ours.
            let _ = std::fs::remove_dir_all(&partial);
        }
        Ok(template)
    }

    pub(crate) fn write_hba(&self, opts: &ClusterOptions) -> Result<(), Error> {
        let method = match opts.auth {
            Auth::ScramSha256 => "scram-sha-256",
            Auth::Trust => "trust",
        };
        let mut hba = String::from(
            "# written by sluice-localpg\n\
             local all all trust\n\
             local replication all trust\n",
        );
        for line in &opts.hba_lines {
            hba.push_str(line);
            hba.push('\n');
        }
        let (kind, suffix) = match opts.tls {
            Tls::Off | Tls::Optional => ("host", ""),
            Tls::Required => ("hostssl", ""),
            Tls::ClientCertRequired => ("hostssl", " clientcert=verify-full"),
        };
        if matches!(opts.tls, Tls::Required | Tls::ClientCertRequired) {
            hba.push_str(
                "hostnossl all all 0.0.0.0/0 reject\nhostnossl replication all 0.0.0.0/0 reject\n",
            );
        }
        for database in ["all", "replication"] {
            hba.push_str(&format!(
                "{kind} {database} all 127.0.0.1/32 {method}{suffix}\n"
            ));
        }
        self.write_server_file("pg_hba.conf", &hba)
    }

    pub(crate) fn write_tls_files(&mut self) -> Result<(), Error> {
        let authority = Authority::new()?;
        let (cert, key) = authority.server()?;
        self.write_server_file("ca.crt", authority.cert_pem())?;
        self.write_server_file("server.crt", &cert)?;
        self.write_server_file("server.key", &key)?;
        // Readable by the test process too, for `sslrootcert`.
        std::fs::write(self.root.join("ca.crt"), authority.cert_pem())
            .map_err(|e| Error::io("writing ca.crt", e))?;
        if self.tls == Tls::ClientCertRequired {
            self.superuser_cert =
                Some(authority.client(SUPERUSER, &self.root, "client-superuser")?);
        }
        self.authority = Some(authority);
        Ok(())
    }

    pub(crate) fn write_server_file(&self, name: &str, contents: &str) -> Result<(), Error> {
        let path = self.data_dir().join(name);
        write_private(&path, contents)?;
        self.user.own(&path)
    }

    pub(crate) fn settings_block(&self, opts: &ClusterOptions) -> String {
        let mut conf = format!(
            "# added by sluice-localpg\n\
             listen_addresses = '127.0.0.1'\n\
             port = {port}\n\
             unix_socket_directories = {socket}\n\
             max_connections = 200\n\
             # 12 and 13 store md5 hashes by default, which scram-sha-256 rules cannot check.\n\
             password_encryption = 'scram-sha-256'\n\
             # Throwaway clusters: no crash safety for an OS crash, much faster tests.\n\
             fsync = off\n\
             full_page_writes = off\n",
            port = self.port,
            socket = quote_literal(&self.socket_dir().display().to_string()),
        );
        if opts.logical {
            conf.push_str(
                "wal_level = logical\nmax_replication_slots = 20\nmax_wal_senders = 20\n",
            );
        }
        if opts.tls != Tls::Off {
            conf.push_str("ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\nssl_ca_file = 'ca.crt'\n");
        }
        for (name, value) in &opts.settings {
            conf.push_str(&format!("{name} = {value}\n"));
        }
        conf
    }
}
