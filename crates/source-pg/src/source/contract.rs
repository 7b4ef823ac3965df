//! The PostgreSQL source as a [`Source`]: what `sluice serve`, `config plan` and `check` see.

use std::sync::Arc;

use async_trait::async_trait;
use serde_json::json;
use sluice_core::{
    CheckReport, CollectionId, CollectionInfo, Provider, Result, Source, SourceProgress, Stop,
};
use tokio::sync::watch;

use super::{PostgresSource, connect};
use crate::tables;

#[async_trait]
impl Source for PostgresSource {
    fn name(&self) -> &str {
        &self.inner.name
    }

    fn provider(&self) -> Provider {
        Provider::Postgres
    }

    async fn run(&self, stop: Stop) {
        let (stopping, stopped) = watch::channel(false);
        let running = self.run_until(stopped);
        tokio::pin!(running);
        tokio::select! {
            _ = &mut running => {}
            _ = stop => {
                stopping.send_replace(true);
                running.await;
            }
        }
    }

    /// The publication's tables with their columns, read from the catalog.
    async fn collections(&self) -> Result<Vec<CollectionInfo>> {
        let mut conn = connect(&self.inner.settings).await?;
        let mut out = Vec::new();
        for (schema, name) in tables::published(&mut conn, &self.inner.spec.publication).await? {
            let Some(table) = tables::describe(&mut conn, None, &schema, &name).await? else {
                continue; // dropped since the publication was listed
            };
            let columns = tables::collection_schema(&mut conn, &table).await?;
            out.push(CollectionInfo {
                id: CollectionId::from(table.collection()),
                schema: Some(columns),
            });
        }
        Ok(out)
    }

    /// The prerequisites; with `create_missing`, a missing publication or slot is what the
    /// source will create, so it is reported as such (as `config plan` says), not as a gap.
    async fn check(&self) -> CheckReport {
        let mut report = crate::check(&self.inner.settings, &self.inner.spec).await;
        if self.inner.options.create_missing {
            for f in &mut report.findings {
                if !f.ok
                    && (f.check == "publication" || f.check == "slot")
                    && f.message.contains("does not exist")
                {
                    f.ok = true;
                    f.message = format!(
                        "{}: it will be created when the sync starts (create_missing = true)",
                        f.message
                    );
                    f.fix = None;
                }
            }
        }
        report
    }

    async fn plan(&self) -> CheckReport {
        crate::plan(
            &self.inner.settings,
            &self.inner.spec,
            self.inner.options.create_missing,
        )
        .await
    }

    fn writer(&self) -> Option<Arc<dyn sluice_core::Writer>> {
        self.inner
            .writer
            .clone()
            .map(|w| w as Arc<dyn sluice_core::Writer>)
    }

    fn writer_missing(&self) -> String {
        format!(
            "sync {:?} has no writer role; add writer = {{ user = \"sluice_writer\", password = {{ env = \"…\" }} }} to its source (docs/proxy.md has the role's grants)",
            self.inner.name
        )
    }

    fn progress(&self) -> SourceProgress {
        let mut details = serde_json::Map::new();
        details.insert("backfill".into(), json!(self.backfill_progress()));
        details.insert("confirmed_lsn".into(), json!(self.confirmed()));
        if let Some(bytes) = self.status(|s| s.slot_retained_bytes) {
            details.insert("slot_retained_wal_bytes".into(), json!(bytes));
        }
        SourceProgress {
            appended: self.appended(),
            details,
        }
    }
}
