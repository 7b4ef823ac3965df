//! The SQL of one consumer table, built once with every identifier quoted.

use super::ConsumerTable;
use crate::checkpoint::Checkpoints;
use crate::copy::probing_key_index;

/// The SQL for one consumer table, built once with every identifier quoted.
#[derive(Clone, Debug)]
pub(crate) struct Statements {
    pub(super) checkpoints: Checkpoints,
    pub(super) create_stage: &'static str,
    pub(super) copy_stage: &'static str,
    pub(super) copy_direct: String,
    pub(super) existing: String,
    pub(super) merge: String,
    /// The same as `merge` with `MERGE` (PostgreSQL 15+), for rows the transaction has seen
    /// exist; a concurrent writer's insert cannot make it fail (it updates those rows). It
    /// probes `sequin_id`'s primary key row by row ([`probing_key_index`]): several
    /// statements, for `raw_sql`.
    pub(super) merge_existing: String,
    pub(super) delete: String,
}

impl Statements {
    pub(crate) fn new(table: &ConsumerTable) -> Self {
        let target = table.qualified();
        Self {
            checkpoints: Checkpoints::new(&table.schema),
            create_stage: "create temp table if not exists _sluice_stage (\
                 sequin_id uuid, sync_id uuid, collection_id text, upstream_id text, payload jsonb, \
                 upstream_updated_at timestamptz, inserted_at timestamptz, updated_at timestamptz) \
                 on commit delete rows",
            copy_stage: "copy pg_temp._sluice_stage from stdin with (format binary)",
            copy_direct: format!(
                "copy {target} (sequin_id, sync_id, collection_id, upstream_id, payload, \
                 upstream_updated_at, inserted_at, updated_at) from stdin with (format binary)"
            ),
            existing: format!("select sequin_id from {target} where sequin_id = any($1)"),
            merge: format!(
                "insert into {target} as t (sequin_id, sync_id, collection_id, upstream_id, payload, \
                   upstream_updated_at, inserted_at, updated_at) \
                 select sequin_id, sync_id, collection_id, upstream_id, payload, upstream_updated_at, \
                   inserted_at, updated_at \
                 from pg_temp._sluice_stage \
                 on conflict (sequin_id) do update set sync_id = excluded.sync_id, \
                   collection_id = excluded.collection_id, upstream_id = excluded.upstream_id, \
                   payload = excluded.payload, upstream_updated_at = excluded.upstream_updated_at, \
                   updated_at = excluded.updated_at \
                 where (t.sync_id, t.collection_id, t.upstream_id, t.upstream_updated_at, t.payload) \
                   is distinct from (excluded.sync_id, excluded.collection_id, excluded.upstream_id, \
                   excluded.upstream_updated_at, excluded.payload)"
            ),
            merge_existing: probing_key_index(&format!(
                "merge into {target} as t using pg_temp._sluice_stage as s on t.sequin_id = s.sequin_id \
                 when matched and (t.sync_id, t.collection_id, t.upstream_id, t.upstream_updated_at, t.payload) \
                   is distinct from (s.sync_id, s.collection_id, s.upstream_id, s.upstream_updated_at, s.payload) \
                   then update set sync_id = s.sync_id, collection_id = s.collection_id, \
                   upstream_id = s.upstream_id, payload = s.payload, \
                   upstream_updated_at = s.upstream_updated_at, updated_at = s.updated_at \
                 when not matched then insert (sequin_id, sync_id, collection_id, upstream_id, payload, \
                   upstream_updated_at, inserted_at, updated_at) \
                   values (s.sequin_id, s.sync_id, s.collection_id, s.upstream_id, s.payload, \
                   s.upstream_updated_at, s.inserted_at, s.updated_at)"
            )),
            delete: format!("delete from {target} where sequin_id = any($1)"),
        }
    }
}
