//! `[proxy]`: the write-back proxy in `sluice serve`, told by the running syncs and consumers
//! which tables of its target are synced and how far each consumer has applied.

use std::collections::BTreeSet;
use std::sync::{Arc, Weak};

use async_trait::async_trait;
use sluice_core::{CollectionId, Config, ConsumerId, LayoutConfig, RecordKey, RecordStream, Seq};
use sluice_proxy::{Catalog, Layout, Proxy, SyncWriter, SyncedTable, WriteBack};
use sluice_target_pg::default_table_name;
use tokio::sync::watch;

use crate::connect::settings_for;
use crate::server::{Server, stop_when};

/// What `serve` knows about the tables sluice writes on the proxied target.
struct ServeCatalog {
    server: Weak<Server>,
    target: String,
}

#[async_trait]
impl Catalog for ServeCatalog {
    async fn synced_tables(&self) -> Vec<SyncedTable> {
        let Some(server) = self.server.upgrade() else {
            return Vec::new();
        };
        // What to ask, read under the lock; the sources are asked after it is released.
        let mut layouts = Vec::new();
        {
            let entities = server.entities.read().await;
            for consumer in entities.consumers.values() {
                if consumer.config.target != self.target {
                    continue;
                }
                let syncs: Vec<_> = entities
                    .syncs
                    .values()
                    .filter(|s| consumer.filter.covers(s.source.provider(), s.config.id))
                    .map(|s| (s.config.clone(), s.source.clone()))
                    .collect();
                layouts.push((
                    consumer.config.name.clone(),
                    consumer.filter.clone(),
                    consumer.config.layout.clone(),
                    syncs,
                ));
            }
        }
        let writer =
            |sync: &sluice_core::SyncConfig, source: &Arc<dyn sluice_core::Source>| SyncWriter {
                sync_id: sync.id,
                name: sync.name.clone(),
                writer: source.writer().ok_or_else(|| source.writer_missing()),
            };
        let mut tables: Vec<SyncedTable> = Vec::new();
        let mut add = |table: SyncedTable| match tables
            .iter_mut()
            .find(|t| t.schema == table.schema && t.table == table.table)
        {
            Some(known) => known.consumers.extend(table.consumers),
            None => tables.push(table),
        };
        for (consumer, filter, layout, syncs) in layouts {
            let (schema, json) = match layout {
                LayoutConfig::ConsumerTable { schema, table, .. } => {
                    add(SyncedTable {
                        schema,
                        table,
                        layout: Layout::ConsumerTable {
                            syncs: syncs
                                .iter()
                                .map(|(sync, source)| writer(sync, source))
                                .collect(),
                        },
                        consumers: vec![consumer.clone()],
                    });
                    continue;
                }
                LayoutConfig::SchemaMirror {
                    schema,
                    collections,
                    ..
                } => (schema, collections),
            };
            for (sync, source) in syncs {
                let mut ids: BTreeSet<CollectionId> = source
                    .collections()
                    .await
                    .map(|c| c.into_iter().map(|c| c.id).collect())
                    .unwrap_or_default();
                ids.extend(json.keys().map(|k| CollectionId(k.clone())));
                for collection in ids {
                    let probe = RecordKey::new(sync.id, collection.0.as_str(), "");
                    if !filter.matches(source.provider(), &probe) {
                        continue;
                    }
                    // The same naming and key as the mirror's own (sluice-target-pg).
                    let described = server
                        .stream
                        .collection_schema(sync.id, &collection)
                        .await
                        .ok()
                        .flatten();
                    let (table, key) = match (described, json.get(&collection.0)) {
                        (Some(described), _) => (default_table_name(&collection.0), described.key),
                        (None, Some(j)) => (
                            j.table
                                .clone()
                                .unwrap_or_else(|| default_table_name(&collection.0)),
                            vec!["id".to_owned()],
                        ),
                        (None, None) => (default_table_name(&collection.0), vec!["id".to_owned()]),
                    };
                    add(SyncedTable {
                        schema: schema.clone(),
                        table,
                        layout: Layout::Mirror {
                            sync: writer(&sync, &source),
                            collection,
                            key,
                        },
                        consumers: vec![consumer.clone()],
                    });
                }
            }
        }
        tables
    }

    async fn applied_through(&self, consumer: &ConsumerId) -> Option<Seq> {
        let server = self.server.upgrade()?;
        let entities = server.entities.read().await;
        entities
            .consumers
            .get(&consumer.0)
            .map(|c| c.handle.cursor())
    }
}

/// Starts `[proxy]`, when configured, until `stop` turns true. The error says what in the
/// config keeps it from starting.
pub async fn start(
    server: &Arc<Server>,
    config: &Config,
    stop: watch::Receiver<bool>,
) -> Result<Option<tokio::task::JoinHandle<()>>, String> {
    let Some(proxy) = &config.proxy else {
        return Ok(None);
    };
    let target = config
        .targets
        .iter()
        .find(|t| t.name == proxy.target)
        .ok_or_else(|| {
            format!(
                "[proxy] target {:?} is not a configured target",
                proxy.target
            )
        })?;
    let tls = match &proxy.tls {
        Some(tls) => Some(sluice_pg::tls::acceptor(
            "[proxy] tls",
            &tls.certificate_file,
            &tls.key_file,
            &[],
        )?),
        None => None,
    };
    let (settings, tunnels) = settings_for(&target.connection, server.reverse.as_ref())
        .await
        .map_err(|e| format!("[proxy] target {:?}: {e}", target.name))?;
    let listener = tokio::net::TcpListener::bind(&proxy.listen)
        .await
        .map_err(|e| format!("[proxy] cannot listen on {}: {e}", proxy.listen))?;
    tracing::info!(
        address = %listener.local_addr().map(|a| a.to_string()).unwrap_or(proxy.listen.clone()),
        target = %target.name,
        tls = tls.is_some(),
        "sluice serve: write-back proxy listening"
    );
    let write_back = WriteBack {
        catalog: Arc::new(ServeCatalog {
            server: Arc::downgrade(server),
            target: target.name.clone(),
        }),
        stream: server.stream.clone(),
        writes_in_transactions: proxy.writes_in_transactions,
        max_rows_per_statement: proxy.max_rows_per_statement,
    };
    let proxy = Proxy::with_write_back(settings, tls, Some(write_back));
    Ok(Some(tokio::spawn(async move {
        let _tunnels = tunnels;
        proxy.serve(listener, stop_when(stop)).await;
    })))
}
