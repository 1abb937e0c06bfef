//! Differential test of decode's storability verdict against the real
//! databases: PostgreSQL (`jsonb`, a database of its own, dropped after) and
//! SQLite (a temporary file), both with the project's migrations.
//!
//! Generated adversarial orders — every escape class, surrogates paired and
//! lone, escaped NULs and a backslash followed by `u0000`, huge, tiny and
//! precise numbers and exponents at `numeric`'s limits, deep and wide unknown
//! fields, duplicate keys, whitespace and Unicode (U+2028, noncharacters,
//! astral, BOM) in every string field — keep their known fields valid, so
//! only storability varies. For each case:
//!
//! * decode accepts ⇔ PostgreSQL accepts the raw text as `jsonb`, except the
//!   two bounds decode keeps on purpose and PostgreSQL does not: nesting
//!   deeper than `MAX_DEPTH` and a canonical form past twice the message
//!   limit (both counted, and checked to be what refused the case);
//! * accepted ⇒ PostgreSQL prints the raw text exactly as decode's canonical
//!   text; the canonical text inserts into both stores' `orders` (PostgreSQL
//!   `jsonb`, SQLite `json_valid`) and reads back byte for byte; decoding
//!   the canonical text gives the same payload and digest.
//!
//! SQLite's `json_valid` is not asked about raw text: it accepts more than
//! RFC 8259 (JSON5, lone surrogate escapes), so the stricter store is the
//! oracle and SQLite has to take what decode wrote.
//!
//! `CONVEYOR_DIFF_CASES` (default 2,000) sets the number of generated cases,
//! `CONVEYOR_DIFF_SEED` the seed (printed, random by default). The corpus in
//! `fuzz/corpus/decode/` is replayed too; `CONVEYOR_DIFF_SAVE=DIR` writes the
//! shortest generated case of each class there, to refresh it.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use conveyor::order::{decode_canonical, Decoded, Poison, PoisonKind};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use sqlx::postgres::PgPoolOptions;
use sqlx::sqlite::{SqliteConnectOptions, SqlitePoolOptions};
use sqlx::{PgPool, SqlitePool};

/// The message limit decode gets here: large enough that `numeric`'s own
/// limits (131,072 digits, a 16,383-digit scale) are what is tested, not the
/// size bound — which still shows up and is counted.
const MAX_BYTES: usize = 1 << 20;
/// Cases per PostgreSQL round trip.
const BATCH: usize = 250;

const PG_ADMIN: &str = "postgres://postgres@127.0.0.1:5432/postgres";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decode_and_the_stores_agree() {
    let cases: usize = std::env::var("CONVEYOR_DIFF_CASES")
        .ok()
        .map(|v| v.parse().expect("CONVEYOR_DIFF_CASES is a number"))
        .unwrap_or(2_000);
    let seed: u64 = std::env::var("CONVEYOR_DIFF_SEED")
        .ok()
        .map(|v| v.parse().expect("CONVEYOR_DIFF_SEED is a number"))
        .unwrap_or_else(rand::random);
    println!("store_differential: {cases} cases, CONVEYOR_DIFF_SEED={seed}");
    let started = Instant::now();
    let tally = with_databases(move |dbs| async move {
        let mut tally = Tally::default();
        let mut generator = Generator::new(seed);
        let save = std::env::var_os("CONVEYOR_DIFF_SAVE").map(std::path::PathBuf::from);
        let mut best = BTreeMap::new();
        let mut done = 0;
        while done < cases {
            let n = BATCH.min(cases - done);
            let t0 = Instant::now();
            let batch: Vec<Case> = (0..n)
                .map(|i| generator.case(format!("gen-{seed}-{}", done + i)))
                .collect();
            tally.generate += t0.elapsed();
            if save.is_some() {
                keep_shortest(&batch, &mut best);
            }
            check_batch(&dbs, &batch, &mut tally).await;
            done += n;
        }
        if let Some(dir) = &save {
            for (class, text) in &best {
                std::fs::write(dir.join(class), text).expect("write a corpus file");
            }
        }
        replay_corpus(&dbs, &mut tally).await;
        tally
    })
    .await;
    println!(
        "store_differential: {tally:?} in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    assert!(tally.accepted > 0 && tally.refused > 0, "{tally:?}");
}

/// One input and what the generator knows about it.
struct Case {
    name: String,
    text: String,
    /// The generator's labels for what is in it (for saving a corpus and for
    /// the failure message).
    tags: BTreeSet<&'static str>,
    /// The `order_id` holds more than `[A-Za-z0-9-]`: an id rule may refuse
    /// it (`invalid_field`) although the text is storable.
    exotic_id: bool,
    /// From the corpus: any order-level verdict is fine, storability is
    /// what is compared.
    from_corpus: bool,
}

#[derive(Debug, Default)]
struct Tally {
    accepted: usize,
    refused: usize,
    /// Refused by decode's depth bound, stored by PostgreSQL.
    depth_bound: usize,
    /// Refused by decode's canonical size bound, stored by PostgreSQL.
    size_bound: usize,
    /// Storable, refused for an order-level reason (corpus, id rules).
    order_rules: usize,
    corpus: usize,
    /// Bytes of text checked.
    bytes: usize,
    /// Where the time went.
    pg_check: Duration,
    decode: Duration,
    stores: Duration,
    generate: Duration,
}

struct Dbs {
    pg: PgPool,
    sqlite: SqlitePool,
}

/// Runs `body` with a fresh PostgreSQL database and SQLite file, both
/// migrated, and drops the database afterwards whatever happens.
async fn with_databases<F, Fut, T>(body: F) -> T
where
    F: FnOnce(std::sync::Arc<Dbs>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    let admin_url = std::env::var("CONVEYOR_TEST_PG").unwrap_or_else(|_| PG_ADMIN.to_string());
    let admin = PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(5))
        .connect(&admin_url)
        .await
        .unwrap_or_else(|e| {
            panic!(
                "PostgreSQL is not reachable at {admin_url} ({e}). Start it: scripts/services \
                 (or pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start)"
            )
        });
    let name = format!(
        "conveyor_diff_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..10]
    );
    sqlx::query(&format!(
        "CREATE DATABASE {name} ENCODING 'UTF8' TEMPLATE template0"
    ))
    .execute(&admin)
    .await
    .expect("create the test database");
    let db_url = admin_url
        .rsplit_once('/')
        .map(|(base, _)| format!("{base}/{name}"))
        .expect("database url");
    let dir = tempfile::tempdir().expect("temporary directory");
    let sqlite_path = dir.path().join("orders.db");
    let outcome = tokio::spawn(async move {
        let pg = PgPoolOptions::new()
            .max_connections(2)
            .connect(&db_url)
            .await
            .expect("connect to the test database");
        sqlx::migrate!("./migrations/postgres")
            .run(&pg)
            .await
            .expect("PostgreSQL migrations");
        // PostgreSQL 15 has no pg_input_is_valid: a subtransaction per
        // value, so one statement answers for a whole batch.
        sqlx::query(
            "CREATE FUNCTION diff_jsonb(t text) RETURNS text LANGUAGE plpgsql AS $$
             BEGIN RETURN t::jsonb::text;
             EXCEPTION WHEN others THEN RETURN 'ERROR: ' || SQLERRM; END $$",
        )
        .execute(&pg)
        .await
        .expect("create diff_jsonb");
        let sqlite = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(
                SqliteConnectOptions::new()
                    .filename(&sqlite_path)
                    .create_if_missing(true),
            )
            .await
            .expect("open the SQLite file");
        sqlx::migrate!("./migrations/sqlite")
            .run(&sqlite)
            .await
            .expect("SQLite migrations");
        let dbs = std::sync::Arc::new(Dbs { pg, sqlite });
        let out = body(dbs.clone()).await;
        dbs.pg.close().await;
        dbs.sqlite.close().await;
        out
    })
    .await;
    let dropped = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .execute(&admin)
        .await;
    admin.close().await;
    drop(dir);
    match outcome {
        Ok(out) => {
            dropped.expect("drop the test database");
            out
        }
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

/// What decode said, as far as storability goes.
enum Verdict {
    Accepted(Decoded),
    /// Not JSON, or JSON the store cannot hold.
    Refused(Poison),
    /// Refused by a bound decode keeps and PostgreSQL does not.
    DepthBound,
    SizeBound,
    /// Storable text, refused as an order.
    OrderRule(Poison),
}

fn verdict(text: &str) -> Verdict {
    match decode_canonical(text.as_bytes(), MAX_BYTES) {
        Ok(d) => Verdict::Accepted(d),
        Err(p) => match p.kind {
            PoisonKind::MalformedJson if p.detail.starts_with("nested deeper") => {
                Verdict::DepthBound
            }
            PoisonKind::TooLarge => Verdict::SizeBound,
            PoisonKind::MalformedJson | PoisonKind::Unstorable => Verdict::Refused(p),
            _ => Verdict::OrderRule(p),
        },
    }
}

async fn check_batch(dbs: &Dbs, batch: &[Case], tally: &mut Tally) {
    let texts: Vec<&str> = batch.iter().map(|c| c.text.as_str()).collect();
    let t0 = Instant::now();
    let pg_says: Vec<String> = sqlx::query_scalar(
        "SELECT diff_jsonb(t) FROM UNNEST($1::text[]) WITH ORDINALITY AS u(t, i) ORDER BY i",
    )
    .bind(&texts)
    .fetch_all(&dbs.pg)
    .await
    .expect("ask PostgreSQL about the batch");
    assert_eq!(pg_says.len(), batch.len());
    tally.bytes += texts.iter().map(|t| t.len()).sum::<usize>();
    tally.pg_check += t0.elapsed();
    let t0 = Instant::now();
    let mut accepted: Vec<(&Case, Decoded)> = Vec::new();
    for (case, pg) in batch.iter().zip(&pg_says) {
        let pg_ok = !pg.starts_with("ERROR: ");
        let why = || describe(case, pg);
        match verdict(&case.text) {
            Verdict::Accepted(d) => {
                assert!(pg_ok, "decode accepted, PostgreSQL refused: {}", why());
                let canonical = std::str::from_utf8(&d.payload).expect("UTF-8 payload");
                assert_eq!(
                    canonical,
                    pg.as_str(),
                    "the canonical text is not what PostgreSQL prints: {}",
                    why()
                );
                let again = decode_canonical(&d.payload, MAX_BYTES)
                    .unwrap_or_else(|p| panic!("canonical text refused ({p}): {}", why()));
                assert_eq!(again.payload, d.payload, "not idempotent: {}", why());
                assert_eq!(again.digest, d.digest);
                tally.accepted += 1;
                accepted.push((case, d));
            }
            Verdict::Refused(p) => {
                assert!(
                    !pg_ok,
                    "decode refused ({p}), PostgreSQL accepted: {}",
                    why()
                );
                tally.refused += 1;
            }
            Verdict::DepthBound => tally.depth_bound += 1,
            Verdict::SizeBound => tally.size_bound += 1,
            Verdict::OrderRule(p) => {
                let allowed = case.from_corpus
                    || (case.exotic_id
                        && p.kind == PoisonKind::InvalidField
                        && p.detail.contains("order_id"));
                assert!(
                    allowed,
                    "the generator made an invalid order ({p}): {}",
                    why()
                );
                assert!(
                    pg_ok,
                    "decode refused the order ({p}) but read the text, PostgreSQL did not: {}",
                    why()
                );
                tally.order_rules += 1;
            }
        }
    }
    tally.decode += t0.elapsed();
    let t0 = Instant::now();
    store_and_read_back(dbs, &accepted).await;
    tally.stores += t0.elapsed();
}

/// Inserts the canonical payloads into both stores' `orders` and reads them
/// back.
async fn store_and_read_back(dbs: &Dbs, accepted: &[(&Case, Decoded)]) {
    if accepted.is_empty() {
        return;
    }
    let ids: Vec<&str> = accepted.iter().map(|(c, _)| c.name.as_str()).collect();
    let customers: Vec<&str> = accepted
        .iter()
        .map(|(_, d)| d.order.customer_id.as_str())
        .collect();
    let amounts: Vec<i64> = accepted.iter().map(|(_, d)| d.order.amount_cents).collect();
    let currencies: Vec<&str> = accepted
        .iter()
        .map(|(_, d)| d.order.currency.as_str())
        .collect();
    let payloads: Vec<&str> = accepted
        .iter()
        .map(|(_, d)| std::str::from_utf8(&d.payload).expect("UTF-8 payload"))
        .collect();
    // Columns named: a later migration may add nullable ones.
    let inserted = sqlx::query(
        "INSERT INTO orders (order_id, status, customer_id, amount_cents, currency, charge_id,
                             payload, source_position, received_at)
         SELECT o, 'accepted', c, a, cur, 'ch-' || o, p::jsonb, 'differential', now()
         FROM UNNEST($1::text[], $2::text[], $3::int8[], $4::text[], $5::text[])
              AS t(o, c, a, cur, p)",
    )
    .bind(&ids)
    .bind(&customers)
    .bind(&amounts)
    .bind(&currencies)
    .bind(&payloads)
    .execute(&dbs.pg)
    .await;
    if let Err(e) = inserted {
        panic!(
            "PostgreSQL refused a canonical payload of this batch ({e}); cases: {:?}",
            ids
        );
    }
    let back: Vec<(String, String)> =
        sqlx::query_as("SELECT order_id, payload::text FROM orders WHERE order_id = ANY($1)")
            .bind(&ids)
            .fetch_all(&dbs.pg)
            .await
            .expect("read back from PostgreSQL");
    let back: BTreeMap<String, String> = back.into_iter().collect();
    for ((case, _), payload) in accepted.iter().zip(&payloads) {
        assert_eq!(
            back.get(&case.name).map(String::as_str),
            Some(*payload),
            "PostgreSQL read back other text: {}",
            describe(case, "")
        );
    }

    let mut tx = dbs.sqlite.begin().await.expect("SQLite transaction");
    for (((case, d), payload), id) in accepted.iter().zip(&payloads).zip(&ids) {
        sqlx::query(
            "INSERT INTO orders (order_id, status, customer_id, amount_cents, currency,
                                 charge_id, payload, source_position, received_at)
             VALUES (?, 'accepted', ?, ?, ?, ?, ?, 'differential', '2026-11-22T10:00:00.000000Z')",
        )
        .bind(id)
        .bind(&d.order.customer_id)
        .bind(d.order.amount_cents)
        .bind(&d.order.currency)
        .bind(format!("ch-{id}"))
        .bind(payload)
        .execute(&mut *tx)
        .await
        .unwrap_or_else(|e| {
            panic!(
                "SQLite refused a canonical payload ({e}): {}",
                describe(case, "")
            )
        });
    }
    tx.commit().await.expect("SQLite commit");
    for ((case, _), payload) in accepted.iter().zip(&payloads) {
        let back: String = sqlx::query_scalar("SELECT payload FROM orders WHERE order_id = ?")
            .bind(&case.name)
            .fetch_one(&dbs.sqlite)
            .await
            .expect("read back from SQLite");
        assert_eq!(
            back.as_str(),
            *payload,
            "SQLite read back other text: {}",
            describe(case, "")
        );
    }
}

fn describe(case: &Case, pg: &str) -> String {
    let clip = |s: &str| -> String {
        if s.len() <= 600 {
            s.to_string()
        } else {
            let mut end = 600;
            while !s.is_char_boundary(end) {
                end -= 1;
            }
            format!("{}… ({} bytes)", &s[..end], s.len())
        }
    };
    format!(
        "case {} {:?}\n  text: {}\n  PostgreSQL: {}",
        case.name,
        case.tags,
        clip(&case.text),
        clip(pg)
    )
}

/// Replays `fuzz/corpus/decode/`: every file that PostgreSQL can be given
/// as text (valid UTF-8, no NUL byte).
async fn replay_corpus(dbs: &Dbs, tally: &mut Tally) {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/decode");
    let mut cases = Vec::new();
    for entry in std::fs::read_dir(&dir).expect("corpus directory") {
        let path = entry.expect("corpus entry").path();
        let bytes = std::fs::read(&path).expect("read a corpus file");
        let Ok(text) = String::from_utf8(bytes) else {
            continue;
        };
        if text.is_empty() || text.contains('\0') {
            continue;
        }
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_string();
        cases.push(Case {
            name: format!("corpus-{name}"),
            text,
            tags: BTreeSet::new(),
            exotic_id: false,
            from_corpus: true,
        });
    }
    assert!(cases.len() >= 45, "the corpus shrank to {}", cases.len());
    tally.corpus = cases.len();
    check_batch(dbs, &cases, tally).await;
}

/// Keeps the shortest case of each class: its verdict, and what refused it
/// or the generator's tag for what it holds.
fn keep_shortest(batch: &[Case], best: &mut BTreeMap<String, String>) {
    for case in batch {
        // Short cases only: a corpus is read by people.
        if case.text.len() > 2048 {
            continue;
        }
        let classes: Vec<String> = match verdict(&case.text) {
            Verdict::Accepted(_) => case
                .tags
                .iter()
                .filter(|t| !matches!(**t, "lone-surrogate" | "escaped-nul" | "too-deep"))
                .filter(|t| !t.starts_with("bad-") && **t != "raw-control")
                .map(|t| format!("store-ok-{t}"))
                .collect(),
            Verdict::Refused(p) => {
                let what = refusal_class(&p.detail);
                let kind = if p.kind == PoisonKind::Unstorable {
                    "unstorable"
                } else {
                    "malformed"
                };
                vec![format!("store-{kind}-{what}")]
            }
            Verdict::DepthBound => vec!["store-malformed-too-deep".to_string()],
            Verdict::SizeBound => vec!["store-too-large-expansion".to_string()],
            Verdict::OrderRule(_) => continue,
        };
        for class in classes {
            let shorter = best.get(&class).is_none_or(|t| t.len() > case.text.len());
            if shorter {
                best.insert(class, case.text.clone());
            }
        }
    }
}

/// A file-name word for a refusal's detail.
fn refusal_class(detail: &str) -> String {
    let head = detail.split(['(', ';', ':']).next().unwrap_or(detail);
    let head = head.split(" at byte").next().unwrap_or(head);
    let words: String = head
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                ' '
            }
        })
        .collect();
    let words: Vec<&str> = words
        .split_whitespace()
        .filter(|w| !w.chars().any(|c| c.is_ascii_digit()))
        .filter(|w| !matches!(*w, "a" | "an" | "the" | "u"))
        .take(5)
        .collect();
    words.join("-")
}

/// A seeded generator of orders whose known fields are valid and whose
/// text varies in everything that decides storability.
struct Generator {
    rng: SmallRng,
    /// This case may hold values the store refuses (and syntax errors).
    hostile: bool,
    /// Numbers left in this case that expand to thousands of digits.
    expansions: u32,
    tags: BTreeSet<&'static str>,
}

impl Generator {
    fn new(seed: u64) -> Self {
        Self {
            rng: SmallRng::seed_from_u64(seed),
            hostile: false,
            expansions: 0,
            tags: BTreeSet::new(),
        }
    }

    fn chance(&mut self, p: f64) -> bool {
        self.rng.random_bool(p)
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.rng.random_range(0..items.len())]
    }

    fn case(&mut self, name: String) -> Case {
        self.hostile = self.chance(0.5);
        self.expansions = 3;
        self.tags.clear();
        let mut out = String::new();
        let exotic_id = self.order(&mut out);
        Case {
            name,
            text: out,
            tags: std::mem::take(&mut self.tags),
            exotic_id,
            from_corpus: false,
        }
    }

    /// Whitespace between tokens: JSON's four, rarely a character that only
    /// looks like whitespace.
    fn ws(&mut self, out: &mut String) {
        if self.hostile && self.chance(0.002) {
            let c = self.pick(&['\u{a0}', '\u{0b}', '\u{0c}', '\u{feff}', '\u{2028}']);
            self.tags.insert("bad-whitespace");
            out.push(c);
        }
        while self.chance(0.3) {
            out.push(self.pick(&[' ', '\t', '\n', '\r']));
        }
    }

    /// Returns whether the id holds more than `[A-Za-z0-9-]`.
    fn order(&mut self, out: &mut String) -> bool {
        let items: Vec<(i64, i64)> = (0..self.rng.random_range(1..5))
            .map(|_| {
                (
                    self.rng.random_range(1..20),
                    self.rng.random_range(0..100_000),
                )
            })
            .collect();
        let mut amount: i64 = items.iter().map(|(q, p)| q * p).sum();
        let mut items = items;
        if amount == 0 {
            items.push((1, 1));
            amount = 1;
        }
        let exotic_id = self.chance(0.3);
        let mut members: Vec<String> = Vec::new();
        let mut m = String::new();
        self.key(&mut m, "order_id");
        self.id(&mut m, exotic_id);
        members.push(std::mem::take(&mut m));
        self.key(&mut m, "customer_id");
        self.id(&mut m, true);
        members.push(std::mem::take(&mut m));
        self.key(&mut m, "currency");
        let currency = self.pick(&["EUR", "USD", "JPY", "GBP", "CHF"]);
        self.known_text(&mut m, currency);
        members.push(std::mem::take(&mut m));
        self.key(&mut m, "amount_cents");
        write!(m, "{amount}").ok();
        members.push(std::mem::take(&mut m));
        self.key(&mut m, "created_at");
        let at = self.pick(&[
            "2026-11-22T10:00:00Z",
            "2026-11-22T10:00:00.123456Z",
            "2026-11-22T11:00:00+01:00",
        ]);
        self.known_text(&mut m, at);
        members.push(std::mem::take(&mut m));
        self.key(&mut m, "items");
        m.push('[');
        for (i, (qty, price)) in items.iter().enumerate() {
            if i > 0 {
                m.push(',');
                self.ws(&mut m);
            }
            let mut fields = Vec::new();
            let mut f = String::new();
            self.key(&mut f, "sku");
            self.id(&mut f, true);
            fields.push(std::mem::take(&mut f));
            self.key(&mut f, "qty");
            write!(f, "{qty}").ok();
            fields.push(std::mem::take(&mut f));
            self.key(&mut f, "unit_price_cents");
            write!(f, "{price}").ok();
            fields.push(std::mem::take(&mut f));
            if self.chance(0.2) {
                self.unknown_members(&mut fields, 3, 4);
            }
            self.object_of(&mut m, fields);
        }
        m.push(']');
        members.push(std::mem::take(&mut m));
        let width = if self.chance(0.05) { 200 } else { 6 };
        self.unknown_members(&mut members, width, 31);
        self.object_of(out, members);
        if self.chance(0.01) {
            self.tags.insert("trailing-whitespace");
            out.push_str(" \n\t\r");
        }
        exotic_id
    }

    /// Unknown members, named `x-…` so that none decodes to a known field;
    /// some share a name (duplicates, spelled alike or not).
    fn unknown_members(&mut self, members: &mut Vec<String>, width: usize, depth: usize) {
        let n = self.rng.random_range(0..=width);
        let mut names: Vec<String> = Vec::new();
        for _ in 0..n {
            let mut m = String::new();
            m.push('"');
            if !names.is_empty() && self.chance(0.15) {
                self.tags.insert("duplicate-key");
                let i = self.rng.random_range(0..names.len());
                m.push_str(&names[i].clone());
            } else {
                let mut name = String::from("x-");
                self.string_body(&mut name, 3);
                names.push(name.clone());
                m.push_str(&name);
            }
            m.push('"');
            self.ws(&mut m);
            m.push(':');
            self.ws(&mut m);
            let d = if self.chance(0.02) {
                self.tags.insert("deep");
                if self.chance(0.15) {
                    if depth > 8 {
                        self.tags.insert("too-deep");
                    }
                    self.rng.random_range(depth + 1..depth + 8)
                } else {
                    depth
                }
            } else {
                self.rng.random_range(0..4)
            };
            self.value(&mut m, d);
            members.push(m);
        }
    }

    /// Writes `{members}` in a random order with random whitespace.
    fn object_of(&mut self, out: &mut String, mut members: Vec<String>) {
        for i in (1..members.len()).rev() {
            let j = self.rng.random_range(0..=i);
            members.swap(i, j);
        }
        out.push('{');
        self.ws(out);
        for (i, m) in members.iter().enumerate() {
            if i > 0 {
                out.push(',');
                self.ws(out);
            }
            out.push_str(m);
            self.ws(out);
        }
        out.push('}');
    }

    /// `"name":` with the name's letters sometimes escaped.
    fn key(&mut self, out: &mut String, name: &str) {
        self.known_text(out, name);
        self.ws(out);
        out.push(':');
        self.ws(out);
    }

    /// A string whose decoded value is `text`, some characters written as
    /// `\u` escapes (either hex case) or `\/`.
    fn known_text(&mut self, out: &mut String, text: &str) {
        out.push('"');
        for c in text.chars() {
            if self.chance(0.1) {
                self.tags.insert("escaped-known-field");
                if c == '/' && self.chance(0.5) {
                    out.push_str("\\/");
                } else {
                    self.u_escape(out, c as u32);
                }
            } else {
                out.push(c);
            }
        }
        out.push('"');
    }

    fn u_escape(&mut self, out: &mut String, unit: u32) {
        if self.chance(0.5) {
            write!(out, "\\u{unit:04x}").ok();
        } else {
            write!(out, "\\u{unit:04X}").ok();
        }
    }

    /// A valid id: starts and ends with an ASCII letter or digit; in
    /// between, if `exotic`, any character an id may hold (no control
    /// characters), raw or escaped, astral ones as surrogate pairs.
    fn id(&mut self, out: &mut String, exotic: bool) {
        out.push('"');
        out.push(self.pick(&['a', 'Z', '7', 'q']));
        for _ in 0..self.rng.random_range(0..6) {
            if !exotic {
                let c = self.pick(&['a', 'B', '0', '9', '-']);
                if self.chance(0.1) {
                    self.u_escape(out, c as u32);
                } else {
                    out.push(c);
                }
                continue;
            }
            self.tags.insert("unicode-id");
            let c = self.pick(&[
                ' ',
                'é',
                'ß',
                'Ж',
                '中',
                '\u{2028}',
                '\u{2029}',
                '\u{a0}',
                '\u{feff}',
                '\u{fffe}',
                '\u{ffff}',
                '\u{fdd0}',
                '\u{e000}',
                '😀',
                '\u{10ffff}',
                '"',
                '\\',
                '/',
                'x',
            ]);
            match self.rng.random_range(0..3) {
                0 if c != '"' && c != '\\' => out.push(c),
                1 if c == '"' || c == '\\' || c == '/' => {
                    out.push('\\');
                    out.push(c);
                }
                _ => self.char_escape(out, c),
            }
        }
        out.push(self.pick(&['b', 'Y', '3']));
        out.push('"');
    }

    /// `c` as `\u` escapes: a surrogate pair above U+FFFF.
    fn char_escape(&mut self, out: &mut String, c: char) {
        let mut units = [0u16; 2];
        for u in c.encode_utf16(&mut units) {
            self.u_escape(out, u32::from(*u));
        }
        if (c as u32) > 0xffff {
            self.tags.insert("surrogate-pair");
        }
    }

    /// A JSON value nested at most `depth` more levels.
    fn value(&mut self, out: &mut String, depth: usize) {
        let kind = if depth == 0 {
            self.rng.random_range(0..3)
        } else if depth > 4 {
            self.rng.random_range(3..5)
        } else {
            self.rng.random_range(0..5)
        };
        match kind {
            0 => {
                out.push('"');
                self.string_body(out, 8);
                out.push('"');
            }
            1 => self.number(out),
            2 => {
                let w = self.pick(&["true", "false", "null"]);
                out.push_str(w);
            }
            3 => {
                let n = if self.chance(0.01) {
                    self.tags.insert("wide-array");
                    self.rng.random_range(50..500)
                } else {
                    self.rng.random_range(0..4)
                };
                out.push('[');
                self.ws(out);
                let next = if depth > 4 {
                    depth - 1
                } else {
                    self.rng.random_range(0..depth)
                };
                for i in 0..n {
                    if i > 0 {
                        out.push(',');
                        self.ws(out);
                    }
                    // Deep cases go deep along one element.
                    let d = if i == 0 { depth - 1 } else { next.min(2) };
                    self.value(out, d);
                    self.ws(out);
                }
                if n == 0 && depth > 4 {
                    self.value(out, depth - 1);
                }
                out.push(']');
            }
            _ => {
                let mut members = Vec::new();
                let wide = self.chance(0.01);
                if wide {
                    self.tags.insert("wide-object");
                }
                let n = if wide {
                    self.rng.random_range(50..300)
                } else {
                    self.rng.random_range(0..4)
                };
                let mut names: Vec<String> = Vec::new();
                for i in 0..n.max(usize::from(depth > 4)) {
                    let mut m = String::from("\"");
                    if !names.is_empty() && self.chance(0.2) {
                        self.tags.insert("duplicate-key");
                        let j = self.rng.random_range(0..names.len());
                        m.push_str(&names[j].clone());
                    } else {
                        let mut name = String::new();
                        self.string_body(&mut name, 3);
                        names.push(name.clone());
                        m.push_str(&name);
                    }
                    m.push('"');
                    self.ws(&mut m);
                    m.push(':');
                    self.ws(&mut m);
                    let d = if i == 0 {
                        depth - 1
                    } else {
                        (depth - 1).min(2)
                    };
                    self.value(&mut m, d);
                    members.push(m);
                }
                self.object_of(out, members);
            }
        }
    }

    /// The inside of a string: up to `pieces` runs of every class.
    fn string_body(&mut self, out: &mut String, pieces: usize) {
        for _ in 0..self.rng.random_range(0..=pieces) {
            let roll = self.rng.random_range(0..100);
            match roll {
                0..=24 => {
                    for _ in 0..self.rng.random_range(1..6) {
                        out.push(self.pick(&['a', 'b', 'Z', '0', ' ', '-', '_', '.']));
                    }
                }
                25..=39 => {
                    self.tags.insert("named-escape");
                    let e = self.pick(&["\\\"", "\\\\", "\\/", "\\b", "\\f", "\\n", "\\r", "\\t"]);
                    out.push_str(e);
                }
                40..=54 => {
                    self.tags.insert("u-escape");
                    let unit = match self.rng.random_range(0..4) {
                        0 => self.rng.random_range(1..0x20),
                        1 => self.pick(&[
                            0x7f, 0x80, 0x85, 0x9f, 0xa0, 0xe9, 0x2028, 0x2029, 0xfeff, 0xfffe,
                            0xffff, 0xfdd0, 0xfdef, 0x41, 0x5c, 0x22, 0x2f, 0x7e,
                        ]),
                        _ => {
                            let u = self.rng.random_range(1..0x10000u32);
                            if (0xd800..0xe000).contains(&u) {
                                0xe000
                            } else {
                                u
                            }
                        }
                    };
                    self.u_escape(out, unit);
                }
                55..=62 => {
                    let c =
                        char::from_u32(self.rng.random_range(0x10000..0x110000)).unwrap_or('😀');
                    self.char_escape(out, c);
                }
                63..=74 => {
                    self.tags.insert("raw-unicode");
                    let c = match self.rng.random_range(0..2) {
                        0 => self.pick(&[
                            'é',
                            'ß',
                            '\u{2028}',
                            '\u{2029}',
                            '\u{feff}',
                            '\u{ffff}',
                            '\u{fffe}',
                            '\u{fdd0}',
                            '\u{10ffff}',
                            '😀',
                            '\u{e000}',
                            '\u{85}',
                            '\u{7f}',
                            '\u{9f}',
                            '\u{1f}',
                        ]),
                        _ => char::from_u32(self.rng.random_range(0x20..0x110000))
                            .unwrap_or('\u{fffd}'),
                    };
                    if c == '\u{1f}' {
                        // A raw control character is a syntax error.
                        if self.hostile && self.chance(0.2) {
                            self.tags.insert("raw-control");
                            out.push(c);
                        }
                    } else if c == '"' || c == '\\' {
                        out.push('\\');
                        out.push(c);
                    } else {
                        out.push(c);
                    }
                }
                75..=79 => {
                    // Text, not an escape: a backslash, then "u0000".
                    self.tags.insert("backslash-u0000");
                    out.push_str("\\\\u0000");
                }
                _ if !self.hostile => out.push('k'),
                80..=85 => {
                    self.tags.insert("lone-surrogate");
                    let high = self.rng.random_range(0xd800..0xdc00);
                    let low = self.rng.random_range(0xdc00..0xe000);
                    match self.rng.random_range(0..5) {
                        0 => self.u_escape(out, high),
                        1 => self.u_escape(out, low),
                        2 => {
                            self.u_escape(out, high);
                            self.u_escape(out, high);
                        }
                        3 => {
                            self.u_escape(out, low);
                            self.u_escape(out, high);
                        }
                        _ => {
                            self.u_escape(out, high);
                            out.push('x');
                        }
                    }
                }
                86..=90 => {
                    self.tags.insert("escaped-nul");
                    out.push_str(self.pick(&["\\u0000", "\\u0000x", "a\\u0000"]));
                }
                91..=92 => {
                    self.tags.insert("bad-escape");
                    out.push_str(self.pick(&["\\x", "\\u12", "\\u12G4", "\\U0041", "\\'", "\\0"]));
                }
                _ => out.push('k'),
            }
        }
    }

    /// A number of every shape, near `numeric`'s limits too.
    fn number(&mut self, out: &mut String) {
        let neg = self.chance(0.3);
        if neg {
            out.push('-');
        }
        let roll = self.rng.random_range(0..100);
        if self.hostile && roll < 4 {
            self.tags.insert("bad-number");
            out.push_str(self.pick(&["01", "1.", ".5", "+1", "1e", "1e+", "0x1", "NaN", "1.e3"]));
            return;
        }
        // Mantissa.
        let int_digits = match self.rng.random_range(0..10) {
            0 => {
                self.tags.insert("long-number");
                self.rng.random_range(20..400)
            }
            _ => self.rng.random_range(1..12),
        };
        if self.chance(0.15) {
            out.push('0');
        } else {
            out.push(char::from(b'1' + self.rng.random_range(0..9u8)));
            for _ in 1..int_digits {
                out.push(char::from(b'0' + self.rng.random_range(0..10u8)));
            }
        }
        if self.chance(0.4) {
            self.tags.insert("fraction");
            out.push('.');
            let n = self.rng.random_range(1..30);
            for i in 0..n {
                // Trailing zeros are kept by numeric.
                let d = if i + 3 > n && self.chance(0.5) {
                    0
                } else {
                    self.rng.random_range(0..10u8)
                };
                out.push(char::from(b'0' + d));
            }
        }
        if self.chance(0.35) {
            self.tags.insert("exponent");
            out.push(self.pick(&['e', 'E']));
            out.push_str(self.pick(&["", "+", "-"]));
            let exp: u64 = if self.expansions > 0 && self.chance(0.2) {
                // Each side of each of numeric's limits: digits before the
                // point, digits after it, the exponent itself.
                self.expansions -= 1;
                self.tags.insert("numeric-limit");
                self.pick(&[
                    131_071u64,
                    131_072,
                    131_070,
                    131_060,
                    16_383,
                    16_382,
                    16_384,
                    16_370,
                    1_073_741_822,
                    1_073_741_823,
                    99_999_999_999,
                    2_147_483_648,
                ])
            } else {
                self.rng.random_range(0..40)
            };
            if self.chance(0.1) {
                out.push_str("000");
            }
            write!(out, "{exp}").ok();
        }
    }
}
