//! Showing a write locally once the upstream took it: the records go into the stream (or
//! arrive through the source's own feed), and the proxy waits until every consumer writing the
//! table has applied them, so the client's next read sees its write.

use std::time::{Duration, Instant};

use sluice_core::{Seq, Version, Written};

use crate::catalog::SyncedTable;
use crate::session::Session;

/// How long the proxy waits for a write to show in the local table before answering anyway
/// (with a warning).
const LOCAL_WAIT: Duration = Duration::from_secs(30);

impl Session {
    /// Waits until what the upstream accepted is in the local table: appends the records the
    /// writer returned, or waits for the source's feed to bring them; then waits until every
    /// consumer writing the table has applied that far. `Err`: why it is not there yet.
    pub(crate) async fn show_locally(
        &mut self,
        table: &SyncedTable,
        written: &Written,
    ) -> Result<(), String> {
        let write_back = self.shared.write_back.clone().expect("checked in may_take");
        let stream = &write_back.stream;
        let deadline = Instant::now() + LOCAL_WAIT;
        let mut through = Seq::START;
        if !written.records.is_empty() {
            // Each record goes just above what the stream holds for it when that is as new as
            // the writer's version (an upstream clock in whole seconds): the proxy's record
            // shows at once, and the source's own next change of it is still newer.
            let mut records = written.records.clone();
            for record in &mut records {
                if let Some(current) = stream.get(&record.key).await.map_err(|e| e.to_string())?
                    && current.record.version >= record.version
                {
                    record.version = Version::new(
                        current.record.version.major,
                        current.record.version.minor + 1,
                    );
                }
            }
            let appended = stream
                .append(records)
                .await
                .map_err(|e| format!("the records stream did not take it: {e}"))?;
            through = appended.head;
        }
        for (key, version) in &written.arriving {
            loop {
                let head = stream.head().await.map_err(|e| e.to_string())?;
                if let Some(entry) = stream.get(key).await.map_err(|e| e.to_string())?
                    && entry.record.version >= *version
                {
                    through = through.max(entry.seq);
                    break;
                }
                if Instant::now() >= deadline {
                    return Err(format!(
                        "the sync has not read the change back from {} yet",
                        key.collection_id
                    ));
                }
                let _ =
                    tokio::time::timeout(Duration::from_millis(100), stream.wait_past(head)).await;
            }
        }
        if through == Seq::START {
            return Ok(());
        }
        for consumer in &table.consumers {
            loop {
                match write_back.catalog.applied_through(consumer).await {
                    Some(at) if at >= through => break,
                    None => {
                        return Err(format!(
                            "consumer {consumer} is not running; it applies the change when it runs"
                        ));
                    }
                    Some(_) if Instant::now() >= deadline => {
                        return Err(format!(
                            "consumer {consumer} has not applied it within {} s; it will",
                            LOCAL_WAIT.as_secs()
                        ));
                    }
                    Some(_) => tokio::time::sleep(Duration::from_millis(2)).await,
                }
            }
        }
        Ok(())
    }
}
