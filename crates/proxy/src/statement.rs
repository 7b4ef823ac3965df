//! Statements, read with PostgreSQL's own grammar (libpg_query): which ones write a table
//! that may be synced, and the queries the proxy runs in their place: the rows an `UPDATE` or
//! `DELETE` touches (`SELECT … FOR UPDATE` with the statement's own `FROM`/`USING` and
//! `WHERE`), the rows an `INSERT` adds, and its `RETURNING` list.
//!
//! Every query is built as a parse tree and printed by libpg_query's deparser, never by
//! pasting the client's text, so quoting and operator precedence stay PostgreSQL's.

use std::collections::HashMap;

use pg_query::NodeEnum;
use pg_query::protobuf as pb;
use sluice_core::sql::quote_ident;
pub(crate) use sluice_core::sql::quote_literal_escaped as literal;

/// What a write does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Verb {
    Insert,
    Update,
    Delete,
}

impl Verb {
    /// `inserting`, for messages (`Error inserting customer: …`).
    pub(crate) fn ing(self) -> &'static str {
        match self {
            Verb::Insert => "inserting",
            Verb::Update => "updating",
            Verb::Delete => "deleting",
        }
    }

    /// The command tag for `rows` rows.
    pub(crate) fn tag(self, rows: usize) -> String {
        match self {
            Verb::Insert => format!("INSERT 0 {rows}"),
            Verb::Update => format!("UPDATE {rows}"),
            Verb::Delete => format!("DELETE {rows}"),
        }
    }

    /// `insert`, `update`, `delete`.
    pub(crate) fn word(self) -> &'static str {
        match self {
            Verb::Insert => "insert",
            Verb::Update => "update",
            Verb::Delete => "delete",
        }
    }
}

/// A table as a statement names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Relation {
    pub schema: Option<String>,
    pub name: String,
    pub alias: Option<String>,
}

impl Relation {
    fn of(range: &pb::RangeVar) -> Self {
        Self {
            schema: (!range.schemaname.is_empty()).then(|| range.schemaname.clone()),
            name: range.relname.clone(),
            alias: range.alias.as_ref().map(|a| a.aliasname.clone()),
        }
    }

    /// The name as `to_regclass` takes it (quoted, so case and odd characters survive).
    pub(crate) fn regclass(&self) -> String {
        match &self.schema {
            Some(schema) => format!("{}.{}", quote_ident(schema), quote_ident(&self.name)),
            None => quote_ident(&self.name),
        }
    }

    /// How columns are qualified in queries over it: the alias, else the name.
    fn reference(&self) -> &str {
        self.alias.as_deref().unwrap_or(&self.name)
    }
}

/// One statement writing a table whose name a synced table has.
#[derive(Clone, Debug)]
pub(crate) struct Write {
    pub relation: Relation,
    pub form: Form,
}

/// The forms of [`Write`].
#[derive(Clone, Debug)]
pub(crate) enum Form {
    /// A plain `INSERT`, `UPDATE` or `DELETE` the proxy can apply upstream.
    Plain(Verb, Box<pb::Node>),
    /// A form it cannot (the message says why and what to do instead).
    Unsupported(String),
}

/// The writes in `sql` to tables named as `is_synced_name` says may be synced; `None` when
/// libpg_query cannot parse it (the target then gives its own error).
pub(crate) fn writes(sql: &str, is_synced_name: impl Fn(&str) -> bool) -> Option<Vec<Write>> {
    let parsed = pg_query::parse(sql, 0).ok()?;
    let top: Vec<&pb::Node> = parsed
        .protobuf
        .stmts
        .iter()
        .filter_map(|s| s.stmt.as_deref())
        .collect();
    let mut writes = Vec::new();
    for (node, _, _, _) in parsed.protobuf.nodes() {
        let (range, what) = match node {
            pg_query::NodeRef::InsertStmt(s) => (s.relation.as_ref(), Some(Verb::Insert)),
            pg_query::NodeRef::UpdateStmt(s) => (s.relation.as_ref(), Some(Verb::Update)),
            pg_query::NodeRef::DeleteStmt(s) => (s.relation.as_ref(), Some(Verb::Delete)),
            pg_query::NodeRef::MergeStmt(s) => (s.relation.as_ref(), None),
            pg_query::NodeRef::CopyStmt(s) if s.is_from => (s.relation.as_ref(), None),
            _ => continue,
        };
        let Some(range) = range else { continue };
        if !is_synced_name(&range.relname) {
            continue;
        }
        let relation = Relation::of(range);
        let whole = top.iter().find(|t| match (&t.node, node) {
            (Some(NodeEnum::InsertStmt(s)), pg_query::NodeRef::InsertStmt(n)) => **s == *n,
            (Some(NodeEnum::UpdateStmt(s)), pg_query::NodeRef::UpdateStmt(n)) => **s == *n,
            (Some(NodeEnum::DeleteStmt(s)), pg_query::NodeRef::DeleteStmt(n)) => **s == *n,
            _ => false,
        });
        let form = match (what, whole) {
            (None, _) if matches!(node, pg_query::NodeRef::CopyStmt(_)) => Form::Unsupported(
                "COPY into a synced table would bypass the upstream; write the rows with INSERT".into(),
            ),
            (None, _) => Form::Unsupported(
                "MERGE into a synced table is not supported; use INSERT, UPDATE and DELETE".into(),
            ),
            (Some(_), None) => Form::Unsupported(
                "a write to a synced table inside another statement (a WITH query, a rule) is not supported; send it as a statement of its own".into(),
            ),
            (Some(_), Some(_)) if top.len() > 1 => Form::Unsupported(
                "a write to a synced table must be sent as a statement of its own, not with others in one query string".into(),
            ),
            (Some(verb), Some(whole)) => match unsupported_part(whole) {
                Some(why) => Form::Unsupported(why),
                None => Form::Plain(verb, Box::new((*whole).clone())),
            },
        };
        writes.push(Write { relation, form });
    }
    Some(writes)
}

/// `WHERE CURRENT OF` names no rows the proxy can read.
fn current_of(where_clause: &Option<Box<pb::Node>>) -> Option<String> {
    matches!(
        where_clause.as_deref().and_then(|w| w.node.as_ref()),
        Some(NodeEnum::CurrentOfExpr(_))
    )
    .then(|| "WHERE CURRENT OF is not supported on a synced table; name the rows in WHERE".into())
}

/// Why a plain INSERT/UPDATE/DELETE still cannot be applied upstream, if it cannot.
fn unsupported_part(statement: &pb::Node) -> Option<String> {
    let (with, returning) = match &statement.node {
        Some(NodeEnum::InsertStmt(s)) => {
            if s.on_conflict_clause.is_some() {
                return Some("INSERT … ON CONFLICT on a synced table is not supported: the upstream decides what a conflict is. Use INSERT for new rows and UPDATE for existing ones".into());
            }
            (&s.with_clause, &s.returning_clause)
        }
        Some(NodeEnum::UpdateStmt(s)) => {
            for target in &s.target_list {
                if let Some(NodeEnum::ResTarget(t)) = &target.node {
                    if !t.indirection.is_empty() {
                        return Some(format!(
                            "setting part of column {} (an array element or a field) is not supported; set the whole column",
                            quote_ident(&t.name)
                        ));
                    }
                    if matches!(
                        t.val.as_deref().and_then(|v| v.node.as_ref()),
                        Some(NodeEnum::MultiAssignRef(_))
                    ) {
                        return Some("SET (a, b) = … is not supported on a synced table; set each column on its own".into());
                    }
                    if matches!(
                        t.val.as_deref().and_then(|v| v.node.as_ref()),
                        Some(NodeEnum::SetToDefault(_))
                    ) {
                        return Some(format!(
                            "SET {} = DEFAULT is not supported on a synced table: the upstream has its own defaults",
                            quote_ident(&t.name)
                        ));
                    }
                }
            }
            if let Some(why) = current_of(&s.where_clause) {
                return Some(why);
            }
            (&s.with_clause, &s.returning_clause)
        }
        Some(NodeEnum::DeleteStmt(s)) => {
            if let Some(why) = current_of(&s.where_clause) {
                return Some(why);
            }
            (&s.with_clause, &s.returning_clause)
        }
        _ => return Some("not a plain INSERT, UPDATE or DELETE".into()),
    };
    if with.is_some() {
        return Some("a WITH clause on a write to a synced table is not supported; send the write as a plain statement".into());
    }
    if returning.as_ref().is_some_and(|r| !r.options.is_empty()) {
        return Some("RETURNING OLD/NEW options are not supported on a synced table".into());
    }
    None
}

fn node(n: NodeEnum) -> pb::Node {
    pb::Node { node: Some(n) }
}

fn string(s: &str) -> pb::Node {
    node(NodeEnum::String(pb::String { sval: s.to_owned() }))
}

fn column(relation: &Relation, name: &str) -> pb::Node {
    node(NodeEnum::ColumnRef(pb::ColumnRef {
        fields: vec![string(relation.reference()), string(name)],
        location: -1,
    }))
}

fn target(value: pb::Node) -> pb::Node {
    node(NodeEnum::ResTarget(Box::new(pb::ResTarget {
        name: String::new(),
        indirection: Vec::new(),
        val: Some(Box::new(value)),
        location: -1,
    })))
}

/// `value::<sql type>`, the type as `format_type` printed it.
fn cast(value: pb::Node, sql_type: &str) -> Result<pb::Node, String> {
    let parsed = pg_query::parse(&format!("SELECT NULL::{sql_type}"), 0)
        .map_err(|e| format!("the column type {sql_type} does not parse: {e}"))?;
    let type_name = parsed
        .protobuf
        .stmts
        .first()
        .and_then(|s| match s.stmt.as_deref()?.node.as_ref()? {
            NodeEnum::SelectStmt(select) => match select.target_list.first()?.node.as_ref()? {
                NodeEnum::ResTarget(t) => match t.val.as_deref()?.node.as_ref()? {
                    NodeEnum::TypeCast(c) => c.type_name.clone(),
                    _ => None,
                },
                _ => None,
            },
            _ => None,
        })
        .ok_or_else(|| format!("the column type {sql_type} is not a type name"))?;
    Ok(node(NodeEnum::TypeCast(Box::new(pb::TypeCast {
        arg: Some(Box::new(value)),
        type_name: Some(type_name),
        location: -1,
    }))))
}

/// A `SELECT` with these parts, printed.
fn select(
    targets: Vec<pb::Node>,
    from: Vec<pb::Node>,
    where_clause: Option<Box<pb::Node>>,
    lock: Option<&Relation>,
) -> Result<String, String> {
    let template = if lock.is_some() {
        "SELECT 1 FROM t FOR UPDATE OF t"
    } else {
        "SELECT 1 FROM t"
    };
    let mut parsed = pg_query::parse(template, 0).map_err(|e| e.to_string())?;
    let stmt = parsed.protobuf.stmts[0]
        .stmt
        .as_deref_mut()
        .ok_or("an empty template")?;
    let Some(NodeEnum::SelectStmt(s)) = stmt.node.as_mut() else {
        return Err("the template is not a SELECT".into());
    };
    s.target_list = targets;
    s.from_clause = from;
    s.where_clause = where_clause;
    if let Some(relation) = lock
        && let Some(NodeEnum::LockingClause(l)) =
            s.locking_clause.first_mut().and_then(|n| n.node.as_mut())
    {
        l.locked_rels = vec![node(NodeEnum::RangeVar(pb::RangeVar {
            relname: relation.reference().to_owned(),
            inh: true,
            relpersistence: "p".into(),
            location: -1,
            ..Default::default()
        }))];
    }
    pg_query::deparse(&parsed.protobuf, Default::default()).map_err(|e| e.to_string())
}

fn from_relation(range: &pb::RangeVar, more: &[pb::Node]) -> Vec<pb::Node> {
    let mut from = vec![node(NodeEnum::RangeVar(range.clone()))];
    from.extend(more.iter().cloned());
    from
}

/// The query whose rows are an `UPDATE`'s: the key columns, then each `SET` value cast to
/// its column's type (as the assignment would), locked `FOR UPDATE`. Returns it and the
/// columns set, in order.
pub(crate) fn update_rows(
    statement: &pb::Node,
    key: &[String],
    types: &HashMap<String, String>,
) -> Result<(String, Vec<String>), String> {
    let Some(NodeEnum::UpdateStmt(s)) = &statement.node else {
        return Err("not an UPDATE".into());
    };
    let range = s.relation.as_ref().ok_or("an UPDATE without a table")?;
    let relation = Relation::of(range);
    let mut targets: Vec<pb::Node> = key.iter().map(|k| target(column(&relation, k))).collect();
    let mut columns = Vec::new();
    for t in &s.target_list {
        let Some(NodeEnum::ResTarget(t)) = &t.node else {
            continue;
        };
        let value = t.val.as_deref().cloned().ok_or("SET without a value")?;
        let sql_type = types.get(&t.name).ok_or_else(|| {
            format!(
                "column {} does not exist in {}",
                quote_ident(&t.name),
                relation.regclass()
            )
        })?;
        targets.push(target(cast(value, sql_type)?));
        columns.push(t.name.clone());
    }
    let sql = select(
        targets,
        from_relation(range, &s.from_clause),
        s.where_clause.clone(),
        Some(&relation),
    )?;
    Ok((sql, columns))
}

/// The query whose rows are a `DELETE`'s: their key columns, locked `FOR UPDATE`.
pub(crate) fn delete_rows(statement: &pb::Node, key: &[String]) -> Result<String, String> {
    let Some(NodeEnum::DeleteStmt(s)) = &statement.node else {
        return Err("not a DELETE".into());
    };
    let range = s.relation.as_ref().ok_or("a DELETE without a table")?;
    let relation = Relation::of(range);
    let targets = key.iter().map(|k| target(column(&relation, k))).collect();
    select(
        targets,
        from_relation(range, &s.using_clause),
        s.where_clause.clone(),
        Some(&relation),
    )
}

/// The rows an `INSERT` adds: a query giving each row's values cast to the columns' types,
/// the columns (in order), and for each row which columns it leaves to their `DEFAULT`
/// (those are not sent upstream).
pub(crate) struct InsertRows {
    pub sql: Option<String>,
    pub columns: Vec<String>,
    pub defaults: Vec<Vec<bool>>,
}

/// See [`InsertRows`]. `table_columns` are the table's columns in order (for an `INSERT`
/// without a column list).
pub(crate) fn insert_rows(
    statement: &pb::Node,
    table_columns: &[String],
    types: &HashMap<String, String>,
) -> Result<InsertRows, String> {
    let Some(NodeEnum::InsertStmt(s)) = &statement.node else {
        return Err("not an INSERT".into());
    };
    let mut columns = Vec::new();
    for c in &s.cols {
        if let Some(NodeEnum::ResTarget(t)) = &c.node {
            if !t.indirection.is_empty() {
                return Err(format!(
                    "inserting into part of column {} is not supported",
                    quote_ident(&t.name)
                ));
            }
            columns.push(t.name.clone());
        }
    }
    let Some(source) = s.select_stmt.as_deref() else {
        // INSERT … DEFAULT VALUES: one row, every column the upstream's to fill.
        return Ok(InsertRows {
            sql: None,
            columns: Vec::new(),
            defaults: vec![Vec::new()],
        });
    };
    let Some(NodeEnum::SelectStmt(query)) = &source.node else {
        return Err("INSERT from something other than a query".into());
    };
    let mut query = (**query).clone();
    let mut defaults = Vec::new();
    let width = if !query.values_lists.is_empty() {
        let mut width = 0;
        for row in &mut query.values_lists {
            let Some(NodeEnum::List(items)) = row.node.as_mut() else {
                continue;
            };
            width = width.max(items.items.len());
            let mut row_defaults = Vec::new();
            for item in &mut items.items {
                let is_default = matches!(item.node, Some(NodeEnum::SetToDefault(_)));
                if is_default {
                    *item = node(NodeEnum::AConst(pb::AConst {
                        isnull: true,
                        location: -1,
                        val: None,
                    }));
                }
                row_defaults.push(is_default);
            }
            defaults.push(row_defaults);
        }
        width
    } else {
        query.target_list.len()
    };
    if columns.is_empty() {
        columns = table_columns.iter().take(width).cloned().collect();
    }
    if width > columns.len() {
        return Err("INSERT has more expressions than target columns".into());
    }
    columns.truncate(width);
    // SELECT v.column1::type, … FROM (<the rows>) AS v (column1, …)
    let names: Vec<String> = (1..=width).map(|i| format!("column{i}")).collect();
    let sub = pb::RangeSubselect {
        lateral: false,
        subquery: Some(Box::new(node(NodeEnum::SelectStmt(Box::new(query))))),
        alias: Some(pb::Alias {
            aliasname: "_sluice_rows".into(),
            colnames: names.iter().map(|n| string(n)).collect(),
        }),
    };
    let rows = Relation {
        schema: None,
        name: "_sluice_rows".into(),
        alias: None,
    };
    let mut targets = Vec::new();
    for (name, col) in names.iter().zip(&columns) {
        let sql_type = types
            .get(col)
            .ok_or_else(|| format!("column {} does not exist", quote_ident(col)))?;
        targets.push(target(cast(column(&rows, name), sql_type)?));
    }
    let sql = select(
        targets,
        vec![node(NodeEnum::RangeSubselect(Box::new(sub)))],
        None,
        None,
    )?;
    Ok(InsertRows {
        sql: Some(sql),
        columns,
        defaults,
    })
}

/// The `RETURNING` list of `statement`, if it has one.
fn returning(statement: &pb::Node) -> Option<&[pb::Node]> {
    let clause = match &statement.node {
        Some(NodeEnum::InsertStmt(s)) => s.returning_clause.as_ref(),
        Some(NodeEnum::UpdateStmt(s)) => s.returning_clause.as_ref(),
        Some(NodeEnum::DeleteStmt(s)) => s.returning_clause.as_ref(),
        _ => None,
    }?;
    (!clause.exprs.is_empty()).then_some(&clause.exprs[..])
}

/// Whether `statement` has a `RETURNING` list.
pub(crate) fn has_returning(statement: &pb::Node) -> bool {
    returning(statement).is_some()
}

/// A `DELETE`'s `RETURNING` rows, read before the rows go: its list over its own
/// `USING`/`WHERE`.
pub(crate) fn delete_returning(statement: &pb::Node) -> Result<Option<String>, String> {
    let (Some(list), Some(NodeEnum::DeleteStmt(s))) = (returning(statement), &statement.node)
    else {
        return Ok(None);
    };
    let range = s.relation.as_ref().ok_or("a DELETE without a table")?;
    select(
        list.to_vec(),
        from_relation(range, &s.using_clause),
        s.where_clause.clone(),
        None,
    )
    .map(Some)
}

/// An `INSERT`'s or `UPDATE`'s `RETURNING` rows, read after the local write: its list over
/// the rows with these keys.
pub(crate) fn returning_by_key(
    statement: &pb::Node,
    relation_range: &Relation,
    key: &[String],
    keys: &[Vec<String>],
) -> Result<Option<String>, String> {
    let Some(list) = returning(statement) else {
        return Ok(None);
    };
    let range = match &statement.node {
        Some(NodeEnum::InsertStmt(s)) => s.relation.clone(),
        Some(NodeEnum::UpdateStmt(s)) => s.relation.clone(),
        _ => None,
    }
    .ok_or("no table")?;
    let base = select(
        list.to_vec(),
        vec![node(NodeEnum::RangeVar(range))],
        None,
        None,
    )?;
    let columns: Vec<String> = key
        .iter()
        .map(|k| {
            format!(
                "{}.{}",
                quote_ident(relation_range.reference()),
                quote_ident(k)
            )
        })
        .collect();
    let rows: Vec<String> = keys
        .iter()
        .map(|values| {
            let literals: Vec<String> = values.iter().map(|v| literal(v)).collect();
            format!("({})", literals.join(", "))
        })
        .collect();
    if rows.is_empty() {
        return Ok(Some(format!("{base} WHERE false")));
    }
    // Text keys compared as text, so any key type works without knowing it.
    let left: Vec<String> = columns.iter().map(|c| format!("{c}::text")).collect();
    Ok(Some(format!(
        "{base} WHERE ({}) IN ({})",
        left.join(", "),
        rows.join(", ")
    )))
}

#[cfg(test)]
#[path = "statement_tests.rs"]
mod tests;
