//! Data arrives exactly as it left: JSON numbers with every digit, floats with every bit,
//! columns added upstream with a default, and random rows of every supported type, from a
//! PostgreSQL source through the records stream into both layouts (the consumer table and
//! the schema mirror), compared with the source bit for bit.

use std::sync::Arc;
use std::time::{Duration, Instant};

use secrecy::SecretString;
use sluice_consumer::ConsumerRuntime;
use sluice_core::{BatchConfig, ConsumerId, LagThresholds, RecordFilter, SyncId};
use sluice_localpg::{Cluster, Role};
use sluice_source_pg::{PostgresSource, SourceOptions, SourceSpec};
use sluice_stream::EmbeddedStream;
use sluice_target_pg::{
    ConnectionSettings, ConsumerTable, ConsumerTableTarget, SchemaMirrorTarget,
};
use tokio::sync::watch;
use uuid::Uuid;

const SYNC: SyncId = SyncId(Uuid::from_u128(0xE4AC7));

/// A source with `source_sql` run, streaming into a consumer table (`sluice.records`) and a
/// schema mirror (`app`) on a target.
struct World {
    source: Cluster,
    target: Cluster,
    stream: Arc<EmbeddedStream>,
    _dir: tempfile::TempDir,
    _stop: watch::Sender<bool>,
}

fn settings(pg: &Cluster, user: &str, password: &str) -> ConnectionSettings {
    let mut s = ConnectionSettings::new("127.0.0.1", pg.port(), "postgres", user);
    s.password = Some(SecretString::from(password.to_owned()));
    s.ssl_mode = sluice_core::SslMode::Disable;
    s
}

async fn world(source_sql: &str) -> World {
    world_with(
        source_sql,
        BatchConfig {
            max_records: 500,
            max_wait_ms: 10,
        },
    )
    .await
}

/// [`world`] with the consumers' batches as `batch` says.
async fn world_with(source_sql: &str, batch: BatchConfig) -> World {
    let source = Cluster::options().source().start().unwrap();
    let target = Cluster::options().target().start().unwrap();
    source.execute("postgres", source_sql).await.unwrap();
    source
        .execute("postgres", "create publication p for all tables")
        .await
        .unwrap();
    target
        .execute(
            "postgres",
            "create role sluice login password 'pw';
             grant connect, create on database postgres to sluice;
             create role sluice_read;",
        )
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let stream = Arc::new(EmbeddedStream::open(dir.path()).await.unwrap());
    let (stop, stopped) = watch::channel(false);
    let src = PostgresSource::new(
        "app",
        SYNC,
        settings(&source, "postgres", source.superuser_password()),
        SourceSpec {
            publication: "p".into(),
            slot: "s".into(),
            failover: false,
        },
        stream.clone(),
        SourceOptions {
            create_missing: true,
            backfill_page: 97,
            heartbeat: Duration::from_millis(300),
            ..SourceOptions::default()
        },
    );
    let shutdown = stopped.clone();
    tokio::spawn(async move { src.run_until(shutdown).await });
    let filter = RecordFilter::Sync {
        sync_id: SYNC,
        collections: None,
    };
    let table = ConsumerTableTarget::new(
        "warehouse",
        settings(&target, "sluice", "pw"),
        ConsumerTable::new("sluice", "records"),
        1,
    )
    .create_if_missing("sluice_read");
    let mirror = SchemaMirrorTarget::new(
        "warehouse",
        settings(&target, "sluice", "pw"),
        "app",
        "sluice_read",
        stream.clone(),
        Default::default(),
    );
    for (id, target) in [
        ("records", Arc::new(table) as Arc<dyn sluice_core::Target>),
        ("mirror", Arc::new(mirror)),
    ] {
        let runtime = ConsumerRuntime::new(
            ConsumerId::from(id),
            filter.clone(),
            stream.clone(),
            target,
            batch,
            LagThresholds::default(),
        );
        tokio::spawn(runtime.run(stopped.clone()));
    }
    World {
        source,
        target,
        stream,
        _dir: dir,
        _stop: stop,
    }
}

async fn texts(pg: &Cluster, sql: &str) -> Vec<String> {
    let mut conn = pg.admin("postgres").await.unwrap();
    sqlx::query_scalar::<_, String>(sqlx::AssertSqlSafe(sql.to_owned()))
        .fetch_all(&mut conn)
        .await
        .unwrap_or_else(|e| vec![format!("error: {e}")])
}

/// Waits until `source_sql` on the source and `target_sql` on the target return the same
/// rows; on timeout, panics with the first rows that differ.
async fn wait_same(w: &World, what: &str, source_sql: &str, target_sql: &str) {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let want = texts(&w.source, source_sql).await;
        let have = texts(&w.target, target_sql).await;
        if want == have {
            assert!(
                !want.is_empty(),
                "{what}: the source query returned nothing"
            );
            return;
        }
        if Instant::now() > deadline {
            let differ: Vec<(String, String)> = want
                .iter()
                .zip(&have)
                .filter(|(a, b)| a != b)
                .take(5)
                .map(|(a, b)| (a.clone(), b.clone()))
                .collect();
            panic!(
                "{what}: {} source rows, {} target rows; first differences (source, target): {differ:#?}",
                want.len(),
                have.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The consumer table's payloads equal the stream's, compared as `jsonb` on the target.
async fn consumer_table_holds_the_stream(w: &World, collection: &str) {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let live: Vec<(String, String)> = w
            .stream
            .live_records()
            .await
            .unwrap()
            .into_iter()
            .filter(|e| e.record.key.collection_id.0 == collection)
            .map(|e| {
                (
                    e.record.key.upstream_id.0.clone(),
                    serde_json::to_string(e.record.change.payload().unwrap()).unwrap(),
                )
            })
            .collect();
        let (ids, payloads): (Vec<String>, Vec<String>) = live.iter().cloned().unzip();
        let mut conn = w.target.admin("postgres").await.unwrap();
        let differ: Result<(i64, i64), _> = sqlx::query_as(
            "select count(*) filter (where r.payload is distinct from s.p::jsonb), count(r.upstream_id)
             from unnest($1::text[], $2::text[]) as s(id, p)
             left join sluice.records r on r.upstream_id = s.id and r.collection_id = $3",
        )
        .bind(&ids)
        .bind(&payloads)
        .bind(collection)
        .fetch_one(&mut conn)
        .await;
        if let Ok((0, found)) = differ
            && found == ids.len() as i64
            && found > 0
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the consumer table does not hold the stream's {collection} payloads: {differ:?} of {}",
            ids.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

const NUMBERS_SQL: &str = r#"
create table public.numbers (id int primary key, f4 real, f8 double precision, jb jsonb, j json, n numeric, b bigint);
insert into public.numbers values
  (1, 'NaN', 'NaN', '{"n": 12345678901234567890123, "f": 0.1000000000000000055511151231257827, "e": 1e400, "r": 99.290, "z": -0, "big": [18446744073709551616, -18446744073709551617, 1.5E-300]}', '{"n": 12345678901234567890123, "r": 99.290, "x": 1e-7}', 'NaN', 9223372036854775807),
  (2, 'Infinity', 'Infinity', '[0.1000000000000000000000000000000000000001, 123456789012345678901234567890123456789012]', '[1.0, 2.50, -0.0]', '12345678901234567890.01234567890123456789', -9223372036854775808),
  (3, '-Infinity', '-Infinity', '99.290', '-0', '-0.000', 0),
  (4, '-0', '-0', '{"a": {"b": [1e10, 1E+10, 2e-5]}}', null, '1e-20', null),
  (5, '1.4e-45', '4.9406564584124654e-324', null, null, null, null),
  (6, '1.1754942e-38', '2.2250738585072009e-308', null, null, null, null),
  (7, '3.4028235e+38', '1.7976931348623157e+308', null, null, null, null),
  (8, '0.1', '101.33333333333333', null, null, null, null);
insert into public.numbers
  select i,
         ((random() - 0.5) * 10 ^ (floor(random() * 70) - 35))::real,
         (random() - 0.5) * 10 ^ (floor(random() * 600) - 300),
         jsonb_build_object('x', (random() - 0.5) * 10 ^ (floor(random() * 600) - 300), 'third', i / 3.0),
         json_build_object('y', i / 7.0::float8),
         (i / 7.0)::numeric(40,35),
         (i::bigint * 104729) # (i::bigint << 40)
  from generate_series(100, 1099) i;
update public.numbers set f8 = i / 3.0 from generate_series(100, 400) i where id = i;
"#;

/// Floats compared by their bits, JSON by `jsonb` text (which keeps every digit and scale).
const NUMBERS_SOURCE: &str = "select concat_ws(' | ', id, float4send(f4), float8send(f8), jb::text, j::jsonb::text, n::text, b) from public.numbers order by id";

#[tokio::test]
async fn json_numbers_and_floats_arrive_bit_equal_in_both_layouts() {
    let w = world(NUMBERS_SQL).await;
    wait_same(
        &w,
        "the schema mirror",
        NUMBERS_SOURCE,
        &NUMBERS_SOURCE.replace("public.numbers", "app.numbers"),
    )
    .await;
    wait_same(
        &w,
        "the consumer table",
        NUMBERS_SOURCE,
        "select concat_ws(' | ', upstream_id::int, float4send((payload->>'f4')::real),
                float8send((payload->>'f8')::float8), nullif(payload->'jb', 'null'), nullif(payload->'j', 'null'),
                payload->>'n', payload->>'b')
         from sluice.records where collection_id = 'public.numbers' order by upstream_id::int",
    )
    .await;
    consumer_table_holds_the_stream(&w, "public.numbers").await;

    // The same values changed live (the change stream, not the backfill) stay exact too.
    w.source
        .execute(
            "postgres",
            // (PostgreSQL prints every NaN as `NaN`, so a NaN's sign and payload bits never leave
            // the server, over logical replication or any other way: NaNs stay as they are.)
            "update public.numbers set f8 = case when f8 = 'NaN' then f8 else -f8 end,
                 f4 = case when f4 = 'NaN' then f4 else -f4 end,
                 jb = jsonb_build_object('again', jb) where id < 600",
        )
        .await
        .unwrap();
    wait_same(
        &w,
        "the schema mirror after live updates",
        NUMBERS_SOURCE,
        &NUMBERS_SOURCE.replace("public.numbers", "app.numbers"),
    )
    .await;
    consumer_table_holds_the_stream(&w, "public.numbers").await;
}

#[tokio::test]
async fn a_column_added_with_a_default_has_its_value_in_every_existing_row() {
    let w = world(
        "create table public.items (id int primary key, name text);
         insert into public.items select i, 'item ' || i from generate_series(1, 300) i;",
    )
    .await;
    let items = "select concat_ws(' | ', id, name, status, score, added) from ITEMS order by id";
    wait_same(
        &w,
        "the first backfill",
        "select concat_ws(' | ', id, name) from public.items order by id",
        "select concat_ws(' | ', id, name) from app.items order by id",
    )
    .await;

    // No change follows the ALTERs: pgoutput says nothing of them, the catalog does. A
    // constant default lives in `attmissingval`; the volatile ones rewrote the table.
    w.source
        .execute(
            "postgres",
            "alter table public.items add column status text not null default 'active';
             alter table public.items add column score double precision default random();
             alter table public.items add column added timestamptz default clock_timestamp();",
        )
        .await
        .unwrap();
    wait_same(
        &w,
        "the mirror after columns were added",
        &items.replace("ITEMS", "public.items"),
        &items.replace("ITEMS", "app.items"),
    )
    .await;
    wait_same(
        &w,
        "the consumer table after columns were added",
        "select concat_ws(' | ', id, status, float8send(score)) from public.items order by id",
        "select concat_ws(' | ', upstream_id, payload->>'status', float8send((payload->>'score')::float8))
         from sluice.records where collection_id = 'public.items' order by upstream_id::int",
    )
    .await;

    // And when changes do follow (the relation message path), in one transaction.
    w.source
        .execute(
            "postgres",
            "begin;
             alter table public.items add column tier int default 3;
             update public.items set name = 'renamed' where id = 1;
             insert into public.items (id, name) values (301, 'new');
             commit;",
        )
        .await
        .unwrap();
    let tiered =
        "select concat_ws(' | ', id, name, status, score, added, tier) from ITEMS order by id";
    wait_same(
        &w,
        "the mirror after a column added with changes",
        &tiered.replace("ITEMS", "public.items"),
        &tiered.replace("ITEMS", "app.items"),
    )
    .await;
}

/// A small deterministic generator (xorshift64*), so a failing seed can be replayed with
/// `SLUICE_PROPERTY_SEED`.
struct Rng {
    state: u64,
    /// The clusters accept numeric infinities (PostgreSQL 14+).
    numeric_infinity: bool,
}

impl Rng {
    fn next(&mut self) -> u64 {
        self.state ^= self.state >> 12;
        self.state ^= self.state << 25;
        self.state ^= self.state >> 27;
        self.state.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len() as u64) as usize]
    }
}

fn literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

fn float8(rng: &mut Rng) -> String {
    let v = f64::from_bits(rng.next());
    match rng.below(10) {
        0 => rng
            .pick(&["NaN", "Infinity", "-Infinity", "-0", "0"])
            .to_owned(),
        1 => format!("{:?}", f64::from_bits(rng.below(1 << 52))), // subnormal
        _ if v.is_nan() => "NaN".to_owned(),
        _ if v.is_infinite() => if v > 0.0 { "Infinity" } else { "-Infinity" }.to_owned(),
        _ => format!("{v:?}"),
    }
}

fn float4(rng: &mut Rng) -> String {
    let v = f32::from_bits(rng.next() as u32);
    match rng.below(10) {
        0 => rng.pick(&["NaN", "Infinity", "-Infinity", "-0"]).to_owned(),
        1 => format!("{:?}", f32::from_bits(rng.below(1 << 23) as u32)),
        _ if v.is_nan() => "NaN".to_owned(),
        _ if v.is_infinite() => if v > 0.0 { "Infinity" } else { "-Infinity" }.to_owned(),
        _ => format!("{v:?}"),
    }
}

fn digits(rng: &mut Rng, max: u64) -> String {
    (0..1 + rng.below(max))
        .map(|_| char::from(b'0' + rng.below(10) as u8))
        .collect()
}

/// Digits without leading zeros, as JSON wants an integer part.
fn integer(rng: &mut Rng, max: u64) -> String {
    let d = digits(rng, max);
    match d.trim_start_matches('0') {
        "" => "0".to_owned(),
        rest => rest.to_owned(),
    }
}

fn numeric(rng: &mut Rng) -> String {
    match rng.below(12) {
        // numeric infinities exist from PostgreSQL 14 on.
        0 if rng.numeric_infinity => rng
            .pick(&["NaN", "Infinity", "-Infinity", "0.000", "-0"])
            .to_owned(),
        0 => rng.pick(&["NaN", "0.000", "-0"]).to_owned(),
        _ => format!(
            "{}{}.{}",
            if rng.chance(40) { "-" } else { "" },
            digits(rng, 40),
            digits(rng, 40)
        ),
    }
}

fn text(rng: &mut Rng) -> String {
    let pieces = [
        "a", "Z", " ", "'", "\"", "\\", ",", "{", "}", "(", ")", "\t", "\n", "\r", "é", "✓", "😀",
        "NULL", "null", "\\x00", "$$", "ü", "日本",
    ];
    (0..rng.below(12)).map(|_| rng.pick(&pieces)).collect()
}

fn json_number(rng: &mut Rng) -> String {
    match rng.below(6) {
        0 => format!(
            "{}{}",
            if rng.chance(50) { "-" } else { "" },
            integer(rng, 45)
        ),
        1 => format!("{}.{}0", integer(rng, 20), digits(rng, 40)),
        2 => format!(
            "{}e{}{}",
            integer(rng, 3),
            rng.pick(&["", "+", "-"]),
            rng.below(400)
        ),
        3 => rng
            .pick(&["-0", "0.0", "99.290", "1.50", "-0.000"])
            .to_owned(),
        _ => match f64::from_bits(rng.next()) {
            v if v.is_finite() => format!("{v:?}"),
            _ => "0.5".to_owned(),
        },
    }
}

fn json(rng: &mut Rng, depth: u32) -> String {
    let quoted = |rng: &mut Rng| serde_json::to_string(&text(rng)).unwrap();
    match if depth > 2 {
        rng.below(4)
    } else {
        rng.below(6)
    } {
        0 => json_number(rng),
        1 => quoted(rng),
        2 => rng.pick(&["true", "false", "null"]).to_owned(),
        3 => json_number(rng),
        4 => format!(
            "[{}]",
            (0..rng.below(4))
                .map(|_| json(rng, depth + 1))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        _ => format!(
            "{{{}}}",
            (0..rng.below(4))
                .map(|i| {
                    // Keys in any script, with quotes and backslashes (unique by their index).
                    let key = serde_json::to_string(&format!("{i}{}", text(rng))).unwrap();
                    format!("{key}: {}", json(rng, depth + 1))
                })
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// A JSON document for a `json` or `jsonb` column. A top-level JSON `null` is left out: the
/// payload cannot tell it from SQL NULL, and both arrive as SQL NULL (documented).
fn document(rng: &mut Rng) -> String {
    loop {
        let doc = json(rng, 0);
        if doc != "null" {
            return doc;
        }
    }
}

fn array(rng: &mut Rng, element: fn(&mut Rng) -> String) -> String {
    let items: Vec<String> = (0..rng.below(5))
        .map(|_| {
            if rng.chance(15) {
                "NULL".to_owned()
            } else {
                let e = element(rng);
                format!("\"{}\"", e.replace('\\', "\\\\").replace('"', "\\\""))
            }
        })
        .collect();
    format!("{{{}}}", items.join(","))
}

fn timestamp(rng: &mut Rng) -> String {
    if rng.chance(5) {
        return rng.pick(&["infinity", "-infinity"]).to_owned();
    }
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}.{:06}",
        1 + rng.below(9998),
        1 + rng.below(12),
        1 + rng.below(28),
        rng.below(24),
        rng.below(60),
        rng.below(60),
        rng.below(1_000_000)
    )
}

const TYPES_SQL: &str = "
create type mood as enum ('sad', 'ok', 'happy', 'it''s \"fine\"');
create table public.every_type (
    id int primary key, flag boolean, small smallint, whole integer, big bigint,
    f4 real, f8 double precision, n numeric, \"läbel ✓\" text, \"Vc \"\"q\"\"\" varchar(40), ch char(4),
    bin bytea, uid uuid, day date, clock time, local timestamp, at timestamptz, span interval,
    doc jsonb, raw json, ints int[], words text[], floats float8[], amounts numeric[],
    feeling mood, addr inet
);";

fn random_row(rng: &mut Rng, id: u64) -> String {
    macro_rules! null_or {
        ($rng:expr, $value:expr $(,)?) => {{
            let value: String = $value;
            if $rng.chance(8) {
                "NULL".to_owned()
            } else {
                value
            }
        }};
    }
    let values = [
        id.to_string(),
        null_or!(rng, rng.pick(&["true", "false"]).to_owned()),
        null_or!(rng, (rng.next() as i16).to_string()),
        null_or!(rng, (rng.next() as i32).to_string()),
        null_or!(rng, (rng.next() as i64).to_string()),
        null_or!(rng, literal(&float4(rng))),
        null_or!(rng, literal(&float8(rng))),
        null_or!(rng, literal(&numeric(rng))),
        null_or!(rng, literal(&text(rng))),
        null_or!(
            rng,
            literal(&text(rng).chars().take(40).collect::<String>())
        ),
        null_or!(rng, literal(&text(rng).chars().take(4).collect::<String>())),
        null_or!(
            rng,
            literal(&format!(
                "\\x{}",
                (0..rng.below(40))
                    .map(|_| format!("{:02x}", rng.below(256)))
                    .collect::<String>()
            )),
        ),
        null_or!(
            rng,
            literal(&Uuid::from_u64_pair(rng.next(), rng.next()).to_string())
        ),
        null_or!(
            rng,
            literal(&format!(
                "{:04}-{:02}-{:02}",
                1 + rng.below(9998),
                1 + rng.below(12),
                1 + rng.below(28)
            )),
        ),
        null_or!(
            rng,
            literal(&format!(
                "{:02}:{:02}:{:02}.{:06}",
                rng.below(24),
                rng.below(60),
                rng.below(60),
                rng.below(1_000_000)
            )),
        ),
        null_or!(rng, literal(&timestamp(rng))),
        null_or!(rng, {
            let at = timestamp(rng);
            let zone = if at.contains(':') {
                rng.pick(&["+00", "-05:30", "+14", ""])
            } else {
                ""
            };
            literal(&format!("{at}{zone}"))
        }),
        null_or!(
            rng,
            literal(&{
                // The time part as [-]H:MM:SS.ffffff: PostgreSQL 12 and 13 overflow on large
                // "N microseconds".
                let micros = (rng.next() >> 20) as i64 - (1 << 43);
                let (sign, abs) = (if micros < 0 { "-" } else { "" }, micros.unsigned_abs());
                format!(
                    "{} months {} days {sign}{}:{:02}:{:02}.{:06}",
                    rng.below(2000) as i64 - 1000,
                    rng.below(2000) as i64 - 1000,
                    abs / 3_600_000_000,
                    abs / 60_000_000 % 60,
                    abs / 1_000_000 % 60,
                    abs % 1_000_000
                )
            }),
        ),
        null_or!(rng, literal(&document(rng))),
        null_or!(rng, literal(&document(rng))),
        null_or!(rng, literal(&array(rng, |r| (r.next() as i32).to_string()))),
        null_or!(rng, literal(&array(rng, text))),
        null_or!(rng, literal(&array(rng, float8))),
        null_or!(rng, literal(&array(rng, numeric))),
        null_or!(
            rng,
            literal(rng.pick(&["sad", "ok", "happy", "it's \"fine\""]))
        ),
        null_or!(
            rng,
            literal(rng.pick(&[
                "10.0.0.1/8",
                "192.168.1.5",
                "::1",
                "2001:db8::ff00:42:8329/64",
                "0.0.0.0/0"
            ])),
        ),
    ];
    format!("({})", values.join(", "))
}

#[tokio::test]
async fn random_rows_of_every_supported_type_round_trip_bit_equal() {
    const ROWS: u64 = 2500;
    let seed = std::env::var("SLUICE_PROPERTY_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    eprintln!("SLUICE_PROPERTY_SEED={seed}");
    // Both ends must know numeric infinities (PostgreSQL 14+) for the rows to carry them.
    let numeric_infinity = [Role::Source, Role::Target]
        .into_iter()
        .all(|role| Cluster::options().role(role).binaries().unwrap().major() >= Some(14));
    let mut rng = Rng {
        state: seed,
        numeric_infinity,
    };
    // More rows than one piece of the mirror's COPY (1,000 rows, sent as each is encoded), in
    // batches of up to 5,000: values cross the pieces' boundaries too.
    let rows: Vec<String> = (1..=ROWS).map(|id| random_row(&mut rng, id)).collect();
    let w = world_with(
        &format!(
            "{TYPES_SQL} insert into public.every_type values {};",
            rows.join(",\n")
        ),
        BatchConfig {
            max_records: 5000,
            max_wait_ms: 200,
        },
    )
    .await;
    // Whole rows as text: floats print their shortest exact form (so equal text is equal
    // bits), numerics every digit and their scale, JSON as `jsonb` keeps it.
    // (`json` keeps its input's spacing and key order, which sluice normalises: compared as
    // `jsonb`.)
    // Two column names that need quoting (unicode, upper case, a quote) also sort before the
    // others by bytes, as the payload's keys are written.
    let row_text = "select concat_ws(' | ', row(id, flag, small, whole, big, f4, f8, n, \"läbel ✓\", \"Vc \"\"q\"\"\", ch, bin,
            uid, day, clock, local, at, span, doc, ints, words, floats, amounts, feeling, addr)::text,
            float4send(f4), float8send(f8), raw::jsonb::text) from TABLE t order by id";
    wait_same(
        &w,
        &format!("the schema mirror (seed {seed})"),
        &row_text.replace("TABLE", "public.every_type"),
        &row_text.replace("TABLE", "app.every_type"),
    )
    .await;
    consumer_table_holds_the_stream(&w, "public.every_type").await;

    // Changed live, every row again (the change stream's path).
    let mut updates = Vec::new();
    for id in 1..=ROWS {
        let row = random_row(&mut rng, id);
        updates.push(format!(
            "delete from public.every_type where id = {id}; insert into public.every_type values {row};"
        ));
    }
    w.source
        .execute("postgres", &updates.join("\n"))
        .await
        .unwrap();
    wait_same(
        &w,
        &format!("the schema mirror after live changes (seed {seed})"),
        &row_text.replace("TABLE", "public.every_type"),
        &row_text.replace("TABLE", "app.every_type"),
    )
    .await;
    consumer_table_holds_the_stream(&w, "public.every_type").await;
}
