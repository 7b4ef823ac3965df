//! Quoting for SQL text: the one place identifiers and literals are quoted.
//!
//! Every crate that builds SQL around a name the user chose (a schema, a table, a role)
//! goes through [`quote_ident`]; nothing formats untrusted text into SQL any other way.

/// Quotes an identifier for PostgreSQL: wraps it in double quotes and doubles any double
/// quote inside, so names with quotes, spaces, capitals or unicode survive unchanged.
///
/// ```
/// assert_eq!(sluice_core::sql::quote_ident(r#"We're "odd" Ünïcode"#), r#""We're ""odd"" Ünïcode""#);
/// ```
pub fn quote_ident(name: &str) -> String {
    let mut quoted = String::with_capacity(name.len() + 2);
    quoted.push('"');
    for c in name.chars() {
        if c == '"' {
            quoted.push('"');
        }
        quoted.push(c);
    }
    quoted.push('"');
    quoted
}

/// Quotes a string literal for PostgreSQL (standard-conforming strings): wraps it in single
/// quotes and doubles any single quote inside.
///
/// ```
/// assert_eq!(sluice_core::sql::quote_literal("it's"), "'it''s'");
/// ```
pub fn quote_literal(value: &str) -> String {
    let mut quoted = String::with_capacity(value.len() + 2);
    quoted.push('\'');
    for c in value.chars() {
        if c == '\'' {
            quoted.push('\'');
        }
        quoted.push(c);
    }
    quoted.push('\'');
    quoted
}

/// `value` as a string constant that reads the same whatever the session's
/// `standard_conforming_strings` says: `E'…'` with quotes and backslashes doubled. For SQL
/// sent into sessions sluice does not configure (the proxy's, on a client's connection).
pub fn quote_literal_escaped(value: &str) -> String {
    let mut quoted = String::with_capacity(value.len() + 3);
    quoted.push_str("E'");
    for c in value.chars() {
        if c == '\'' || c == '\\' {
            quoted.push(c);
        }
        quoted.push(c);
    }
    quoted.push('\'');
    quoted
}

/// A schema-qualified name, quoted: `"schema"."name"`.
pub fn qualified(schema: &str, name: &str) -> String {
    format!("{}.{}", quote_ident(schema), quote_ident(name))
}

/// A statement that serialises sluice's DDL in one schema until the end of the transaction
/// it runs in: consumers started together would otherwise race to create the same schema or
/// table, and PostgreSQL reports such a race as a unique violation in its catalog or
/// `tuple concurrently updated`. Run it first in the transaction (or multi-statement simple
/// query) that holds the DDL; it needs no privilege.
///
/// ```
/// assert_eq!(
///     sluice_core::sql::schema_ddl_lock("app"),
///     "select pg_advisory_xact_lock(hashtext('sluice ddl ' || 'app'))"
/// );
/// ```
pub fn schema_ddl_lock(schema: &str) -> String {
    format!(
        "select pg_advisory_xact_lock(hashtext('sluice ddl ' || {}))",
        quote_literal(schema)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_doubles_the_quote_character_only() {
        assert_eq!(quote_ident("orders"), "\"orders\"");
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(quote_ident("with space"), "\"with space\"");
        assert_eq!(quote_literal("a'b\"c"), "'a''b\"c'");
        assert_eq!(qualified("my schema", "T"), "\"my schema\".\"T\"");
    }
}
