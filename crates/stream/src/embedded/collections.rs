//! The stream's collections: each `(sync_id, collection_id)` is stored once, in `collections`,
//! with the provider of its records, and a record names it by that row's integer id. The key
//! index and every record's row then carry an integer in place of a uuid and a name.
//!
//! Ids are kept in memory, for writers and readers alike, once they are known to be committed:
//! a writer learns the ids it created only after its transaction commits (a rolled-back id may
//! be given to another collection later), and a reader reads an id it does not know from the
//! file it is reading.

use std::collections::HashMap;

use super::*;

/// What a collection id stands for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Named {
    pub(super) provider: Provider,
    pub(super) sync_id: SyncId,
    pub(super) collection_id: CollectionId,
}

/// The collection ids known to be committed.
#[derive(Default)]
pub(super) struct Known {
    by_id: HashMap<i64, Arc<Named>>,
    by_name: HashMap<SyncId, HashMap<String, (i64, Provider)>>,
}

impl Known {
    fn id(&self, sync_id: SyncId, collection: &str) -> Option<(i64, Provider)> {
        self.by_name.get(&sync_id)?.get(collection).copied()
    }

    fn learn(&mut self, id: i64, named: Named) {
        self.by_name
            .entry(named.sync_id)
            .or_default()
            .insert(named.collection_id.0.clone(), (id, named.provider));
        self.by_id.insert(id, Arc::new(named));
    }
}

pub(super) type Shared = std::sync::Mutex<Known>;

fn lock(shared: &Shared) -> std::sync::MutexGuard<'_, Known> {
    shared.lock().unwrap_or_else(|e| e.into_inner())
}

/// The id of `(sync_id, collection)` as the file has it (or the memory), if it has one.
pub(super) fn find(
    shared: &Shared,
    conn: &Connection,
    sync_id: SyncId,
    collection: &str,
) -> Result<Option<i64>> {
    if let Some((id, _)) = lock(shared).id(sync_id, collection) {
        return Ok(Some(id));
    }
    conn.prepare_cached("select id from collections where sync_id = ? and collection_id = ?")
        .and_then(|mut s| {
            s.query_row((sync_id.0.as_bytes().as_slice(), collection), |r| r.get(0))
                .optional()
        })
        .or_storage("reading collections")
}

/// Resolves the collections of one write, creating the ones the file lacks; the ids it
/// created are learnt by [`Ids::commit`], after the write commits.
pub(super) struct Ids<'s> {
    shared: &'s Shared,
    created: Vec<(i64, Named)>,
    last: Option<(SyncId, i64, Provider)>,
    last_name: String,
}

impl<'s> Ids<'s> {
    pub(super) fn new(shared: &'s Shared) -> Self {
        Self {
            shared,
            created: Vec::new(),
            last: None,
            last_name: String::new(),
        }
    }

    /// The id for `record`'s collection. A collection whose records come from another provider
    /// than before takes the new one.
    pub(super) fn of(&mut self, tx: &Connection, record: &Record) -> Result<i64> {
        let (sync_id, collection) = (record.key.sync_id, record.key.collection_id.0.as_str());
        if let Some((sync, id, provider)) = self.last
            && sync == sync_id
            && provider == record.provider
            && self.last_name == collection
        {
            return Ok(id);
        }
        let known = lock(self.shared).id(sync_id, collection);
        let created = self
            .created
            .iter()
            .find(|(_, n)| n.sync_id == sync_id && n.collection_id.0 == collection)
            .map(|(id, n)| (*id, n.provider));
        let id = match known.or(created) {
            Some((id, provider)) if provider == record.provider => id,
            _ => {
                let id = tx
                    .prepare_cached(
                        "insert into collections (provider, sync_id, collection_id) values (?, ?, ?) \
                         on conflict (sync_id, collection_id) do update set provider = excluded.provider \
                         returning id",
                    )
                    .and_then(|mut s| {
                        s.query_row(
                            (
                                record.provider.as_str(),
                                sync_id.0.as_bytes().as_slice(),
                                collection,
                            ),
                            |r| r.get(0),
                        )
                    })
                    .or_storage("storing a collection")?;
                self.created.retain(|(created, _)| *created != id);
                self.created.push((
                    id,
                    Named {
                        provider: record.provider,
                        sync_id,
                        collection_id: record.key.collection_id.clone(),
                    },
                ));
                id
            }
        };
        self.last = Some((sync_id, id, record.provider));
        self.last_name.clear();
        self.last_name.push_str(collection);
        Ok(id)
    }

    /// Learns the ids this write created or changed: call once it has committed.
    pub(super) fn commit(self) {
        if !self.created.is_empty() {
            let mut known = lock(self.shared);
            for (id, named) in self.created {
                known.learn(id, named);
            }
        }
    }
}

/// Names collection ids for one read.
pub(super) struct Names<'c> {
    shared: &'c Shared,
    conn: &'c Connection,
    last: Option<(i64, Arc<Named>)>,
}

impl<'c> Names<'c> {
    pub(super) fn new(shared: &'c Shared, conn: &'c Connection) -> Self {
        Self {
            shared,
            conn,
            last: None,
        }
    }

    /// What collection id `id` stands for.
    pub(super) fn name(&mut self, id: i64) -> Result<Arc<Named>> {
        if let Some((last, named)) = &self.last
            && *last == id
        {
            return Ok(named.clone());
        }
        let known = lock(self.shared).by_id.get(&id).cloned();
        let named = match known {
            Some(named) => named,
            None => {
                let named = self.read(id)?;
                lock(self.shared).learn(id, named.clone());
                Arc::new(named)
            }
        };
        self.last = Some((id, named.clone()));
        Ok(named)
    }

    fn read(&self, id: i64) -> Result<Named> {
        let corrupt = || Error::invalid(format!("records stream: unknown collection {id}"));
        let (provider, sync_id, collection): (String, Vec<u8>, String) = self
            .conn
            .prepare_cached("select provider, sync_id, collection_id from collections where id = ?")
            .and_then(|mut s| s.query_row([id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?))))
            .optional()
            .or_storage("reading collections")?
            .ok_or_else(corrupt)?;
        Ok(Named {
            provider: Provider::from_str(&provider)?,
            sync_id: SyncId(Uuid::from_slice(&sync_id).map_err(|_| corrupt())?),
            collection_id: CollectionId(collection),
        })
    }
}
