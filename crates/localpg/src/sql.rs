//! Reaching a cluster: URLs and connect options for any role, and SQL run as the superuser
//! (statements, databases, roles).

use super::*;

impl Cluster {
    /// A URL for the superuser, with the TLS parameters the cluster needs
    /// (`sslmode=verify-full` and the CA when TLS is on; the superuser's client certificate
    /// when one is required).
    pub fn url(&self, database: &str) -> String {
        self.url_as(
            SUPERUSER,
            Some(&self.password),
            database,
            self.superuser_cert.as_ref(),
        )
    }

    /// A URL for any role. TLS parameters follow the cluster's mode; pass a client
    /// certificate when the cluster requires one.
    pub fn url_as(
        &self,
        user: &str,
        password: Option<&str>,
        database: &str,
        cert: Option<&ClientCert>,
    ) -> String {
        let mut url = url::Url::parse("postgres://127.0.0.1").expect("a constant URL parses");
        let _ = url.set_port(Some(self.port));
        let _ = url.set_username(user);
        let _ = url.set_password(password);
        url.path_segments_mut()
            .expect("postgres URLs have paths")
            .push(database);
        {
            let mut query = url.query_pairs_mut();
            match self.ca_cert() {
                None => {
                    query.append_pair("sslmode", "disable");
                }
                Some(ca) => {
                    query.append_pair("sslmode", "verify-full");
                    query.append_pair("sslrootcert", &ca.display().to_string());
                }
            }
            if let Some(cert) = cert {
                query.append_pair("sslcert", &cert.cert.display().to_string());
                query.append_pair("sslkey", &cert.key.display().to_string());
            }
        }
        url.to_string()
    }

    /// Superuser connection options over the Unix socket (no TLS or password needed).
    pub fn admin_options(&self, database: &str) -> PgConnectOptions {
        PgConnectOptions::new()
            .socket(self.socket_dir())
            .port(self.port)
            .username(SUPERUSER)
            .database(database)
            .disable_statement_logging()
    }

    /// A superuser connection to `database` over the Unix socket.
    pub async fn admin(&self, database: &str) -> Result<PgConnection, Error> {
        Ok(PgConnection::connect_with(&self.admin_options(database)).await?)
    }

    /// Runs SQL (one or more statements) as the superuser in `database`.
    pub async fn execute(&self, database: &str, sql: &str) -> Result<(), Error> {
        let mut conn = self.admin(database).await?;
        sqlx::raw_sql(AssertSqlSafe(sql.to_owned()))
            .execute(&mut conn)
            .await?;
        conn.close().await?;
        Ok(())
    }

    /// Creates a database owned by the superuser.
    pub async fn create_database(&self, name: &str) -> Result<(), Error> {
        self.execute(
            "postgres",
            &format!("create database {}", quote_ident(name)),
        )
        .await
    }

    /// Creates a database with a name unique in this cluster (`<prefix>_<n>`) and returns
    /// the name: one database per test on a shared cluster.
    pub async fn fresh_database(&self, prefix: &str) -> Result<String, Error> {
        let n = self.databases.fetch_add(1, Ordering::Relaxed) + 1;
        let name = format!("{prefix}_{n}");
        self.create_database(&name).await?;
        Ok(name)
    }

    /// Creates a login role, with a password unless `None`.
    pub async fn create_role(&self, name: &str, password: Option<&str>) -> Result<(), Error> {
        let password = password
            .map(|p| format!(" password {}", quote_literal(p)))
            .unwrap_or_default();
        self.execute(
            "postgres",
            &format!("create role {} login{password}", quote_ident(name)),
        )
        .await
    }

    /// Gives the superuser its password, over the socket. It runs on a thread of its own
    /// with its own runtime, so that clusters can be started from sync and async code alike
    /// (and no `psql` is needed).
    pub(crate) fn set_superuser_password(&self) -> Result<(), Error> {
        // Hashed for SCRAM whatever the cluster's password_encryption (md5 on 12 and 13, or
        // as a test chose), since the pg_hba.conf rules ask for scram-sha-256.
        let sql = format!(
            "set password_encryption = 'scram-sha-256'; alter role {} password {}",
            quote_ident(SUPERUSER),
            quote_literal(&self.password)
        );
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .map_err(|e| Error::io("starting a runtime", e))?;
                    runtime.block_on(self.execute("postgres", &sql))
                })
                .join()
                .unwrap_or_else(|_| {
                    Err(Error::io(
                        "setting the superuser password",
                        std::io::ErrorKind::Other.into(),
                    ))
                })
        })
    }
}
