//! Tests of `statement.rs`: what is recognised, what is refused, and the queries built.

use super::*;

fn synced(name: &str) -> bool {
    name == "customer"
}

fn one(sql: &str) -> Write {
    let mut writes = writes(sql, synced).unwrap();
    assert_eq!(writes.len(), 1, "{sql}");
    writes.remove(0)
}

fn unsupported(sql: &str) -> String {
    match one(sql).form {
        Form::Unsupported(why) => why,
        Form::Plain(..) => panic!("{sql} was taken as plain"),
    }
}

#[test]
fn writes_to_synced_names_are_found_and_the_rest_pass() {
    assert!(writes("select * from customer", synced).unwrap().is_empty());
    assert!(writes("update other set a = 1", synced).unwrap().is_empty());
    assert!(writes("this is not sql", synced).is_none());
    let w = one("UPDATE stripe.customer AS c SET email = 'x' WHERE c.id = $1");
    assert_eq!(
        w.relation,
        Relation {
            schema: Some("stripe".into()),
            name: "customer".into(),
            alias: Some("c".into())
        }
    );
    assert!(matches!(w.form, Form::Plain(Verb::Update, _)));
    // A quoted name keeps its case and characters.
    let w = writes(r#"delete from "Odd ""Schema"".x"."customer""#, synced)
        .unwrap()
        .remove(0);
    assert_eq!(w.relation.regclass(), r#""Odd ""Schema"".x"."customer""#);
}

#[test]
fn forms_the_upstream_cannot_take_are_refused_with_the_way_out() {
    assert!(
        unsupported("insert into customer (id) values ('a') on conflict do nothing")
            .contains("ON CONFLICT")
    );
    assert!(
        unsupported("merge into customer c using x on true when matched then delete")
            .contains("MERGE")
    );
    assert!(unsupported("copy customer from stdin").contains("COPY"));
    assert!(
        unsupported("with x as (delete from customer returning *) select * from x")
            .contains("statement of its own")
    );
    assert!(
        unsupported("update customer set email = 'a'; select 1").contains("statement of its own")
    );
    assert!(unsupported("update customer set (a, b) = (1, 2)").contains("each column"));
    assert!(unsupported("update customer set a = default").contains("DEFAULT"));
    assert!(unsupported("update customer set a[1] = 2").contains("whole column"));
}

#[test]
fn update_rows_lock_the_statements_own_rows_and_cast_like_an_assignment() {
    let w = one(
        "UPDATE stripe.customer c SET email = lower($1), balance = c.balance + 1 FROM other o WHERE c.id = o.id AND o.flag",
    );
    let Form::Plain(_, statement) = w.form else {
        panic!()
    };
    let types = HashMap::from([
        ("email".to_owned(), "text".to_owned()),
        ("balance".to_owned(), "bigint".to_owned()),
    ]);
    let (sql, columns) = update_rows(&statement, &["id".into()], &types).unwrap();
    assert_eq!(columns, ["email", "balance"]);
    assert_eq!(
        sql,
        "SELECT c.id, lower($1)::text, (c.balance + 1)::bigint FROM stripe.customer c, other o WHERE c.id = o.id AND o.flag FOR UPDATE OF c"
    );
}

#[test]
fn insert_rows_keep_defaults_out_and_returning_reads_by_key() {
    let w = one(
        "insert into customer (email, name) values ('a@x', default), ($1, 'B') returning id, email",
    );
    let Form::Plain(_, statement) = w.form else {
        panic!()
    };
    let types = HashMap::from([
        ("email".to_owned(), "text".to_owned()),
        ("name".to_owned(), "character varying(20)".to_owned()),
    ]);
    let rows = insert_rows(&statement, &[], &types).unwrap();
    assert_eq!(rows.columns, ["email", "name"]);
    assert_eq!(rows.defaults, [vec![false, true], vec![false, false]]);
    assert_eq!(
        rows.sql.unwrap(),
        "SELECT _sluice_rows.column1::text, _sluice_rows.column2::varchar(20) FROM (VALUES ('a@x', NULL), ($1, 'B')) _sluice_rows(column1, column2)"
    );
    let back = returning_by_key(
        &statement,
        &w.relation,
        &["id".into()],
        &[vec!["cus_1".into()], vec!["it's".into()]],
    )
    .unwrap()
    .unwrap();
    assert_eq!(
        back,
        r#"SELECT id, email FROM customer WHERE ("customer"."id"::text) IN ((E'cus_1'), (E'it''s'))"#
    );
}
