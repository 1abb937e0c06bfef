//! Secrets are never printed. A recognisable secret goes into every place
//! the configuration can hold one — passwords from the environment and from
//! files, URL userinfo (database, RabbitMQ, basic auth of both downstreams),
//! a database URL's `?password=`, secret-naming `kafka.properties` — and then
//! `conveyor check-config` (valid and invalid), the daemon's logs in both
//! formats over a short real run (RabbitMQ with a user whose password is one
//! of the secrets, PostgreSQL, the simulator), a `/metrics` scrape and the
//! error of a start-up that librdkafka refuses are searched for it.

mod common;

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use common::broker::rabbitmqctl;
use common::{binary, metric, wait_for, Daemon, Env};
use conveyor::tools::produce::{Mix, OrderGen};
use conveyor::tools::sim::Knobs;
use nix::sys::signal::Signal;

/// One run's secrets: `S3cr3t-<random>-<place>`, so that a search for the
/// prefix finds any of them and a hit says which place leaked.
struct Secrets {
    prefix: String,
    dir: tempfile::TempDir,
}

impl Secrets {
    fn new() -> Self {
        Self {
            prefix: format!(
                "S3cr3t-{}",
                &uuid::Uuid::new_v4().simple().to_string()[..12]
            ),
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    fn get(&self, place: &str) -> String {
        format!("{}-{place}", self.prefix)
    }

    /// A file holding the secret of `place` (with the newline editors add).
    fn file(&self, place: &str) -> PathBuf {
        let path = self.dir.path().join(place);
        std::fs::write(&path, format!("{}\n", self.get(place))).expect("write secret file");
        path
    }

    /// Panics, showing the offending lines, if any secret is in `text`.
    fn assert_absent(&self, what: &str, text: &str) {
        let hits: Vec<&str> = text.lines().filter(|l| l.contains(&self.prefix)).collect();
        assert!(
            hits.is_empty(),
            "{what} prints a secret:\n{}",
            hits.join("\n")
        );
    }
}

/// `http://conveyor:<secret>@host:port`: basic auth in a downstream URL.
fn with_userinfo(url: &str, user: &str, password: &str) -> String {
    let mut u = url::Url::parse(url).expect("url");
    u.set_username(user).expect("username");
    u.set_password(Some(password)).expect("password");
    u.as_str().trim_end_matches('/').to_string()
}

/// A RabbitMQ user of this test, deleted at the end (or on drop).
struct RabbitUser {
    name: String,
    deleted: bool,
}

impl RabbitUser {
    async fn create(name: &str, password: &str) -> Self {
        rabbitmqctl(&["-q", "add_user", name, password])
            .await
            .unwrap_or_else(|e| panic!("{e}; start RabbitMQ: rabbitmq-server -detached"));
        let user = Self {
            name: name.to_string(),
            deleted: false,
        };
        rabbitmqctl(&["-q", "set_permissions", "-p", "/", name, ".*", ".*", ".*"])
            .await
            .expect("set_permissions");
        user
    }

    async fn delete(mut self) {
        rabbitmqctl(&["-q", "delete_user", &self.name]).await.ok();
        self.deleted = true;
    }
}

impl Drop for RabbitUser {
    fn drop(&mut self) {
        if !self.deleted {
            // A failed test: best effort, blocking is fine while unwinding.
            std::process::Command::new("rabbitmqctl")
                .args(["-q", "delete_user", &self.name])
                .output()
                .ok();
        }
    }
}

/// The configuration file: what only a file can say (`kafka.properties`
/// keys contain dots) and the RabbitMQ URL, whose userinfo is overridden
/// by `rabbitmq.username` / `rabbitmq.password`.
fn config_file(s: &Secrets) -> PathBuf {
    let path = s.dir.path().join("conveyor.toml");
    let text = format!(
        r#"
[rabbitmq]
url = "amqp://ignored:{amqp}@127.0.0.1:5672/%2f"

[kafka.properties]
"security.protocol" = "SASL_SSL"
"sasl.mechanisms" = "PLAIN"
"sasl.username" = "conveyor"
"sasl.password" = "{sasl}"
"sasl.oauthbearer.config" = "principal=conveyor extension_token={oauth}"
"sasl.oauthbearer.client.secret" = "{client_secret}"
"sasl.jaas.config" = "org.apache.kafka.common.security.plain.PlainLoginModule required password=\"{jaas}\";"
"ssl.key.password" = "{key_password}"
"ssl.keystore.password" = "{keystore_password}"
"ssl.key.pem" = "-----BEGIN PRIVATE KEY-----\n{key_pem}\n-----END PRIVATE KEY-----"
"#,
        amqp = s.get("amqp-url-userinfo"),
        sasl = s.get("sasl-password"),
        oauth = s.get("oauthbearer-config"),
        client_secret = s.get("oauthbearer-client-secret"),
        jaas = s.get("jaas-config"),
        key_password = s.get("ssl-key-password"),
        keystore_password = s.get("ssl-keystore-password"),
        key_pem = s.get("ssl-key-pem"),
    );
    std::fs::write(&path, text).expect("write config");
    path
}

/// Environment overrides carrying the other secrets, for `env`'s world and
/// the RabbitMQ user `rabbit_user` (whose real password is in the file).
fn secret_env(s: &Secrets, env: &Env, rabbit_user: &str) -> Vec<(String, String)> {
    let mut db = url::Url::parse(&env.db_url).expect("db url");
    db.set_password(Some(&s.get("db-url-userinfo")))
        .expect("password");
    db.set_query(Some(&format!("password={}", s.get("db-url-query"))));
    [
        ("CONVEYOR_CONFIG", config_file(s).display().to_string()),
        ("CONVEYOR__DATABASE__URL", db.to_string()),
        ("CONVEYOR__DATABASE__PASSWORD", s.get("db-env")),
        (
            "CONVEYOR__DATABASE__PASSWORD_FILE",
            s.file("db-file").display().to_string(),
        ),
        ("CONVEYOR__RABBITMQ__USERNAME", rabbit_user.to_string()),
        ("CONVEYOR__RABBITMQ__PASSWORD", s.get("rabbit-env")),
        (
            "CONVEYOR__RABBITMQ__PASSWORD_FILE",
            s.file("rabbit-file").display().to_string(),
        ),
        (
            "CONVEYOR__RULE_ENGINE__URL",
            with_userinfo(&env.sim.url, "conveyor", &s.get("rules-basic-auth")),
        ),
        (
            "CONVEYOR__PAYMENT__URL",
            with_userinfo(&env.sim.url, "conveyor", &s.get("payment-basic-auth")),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

/// Runs the binary with `args` and `vars` (nothing inherited from the
/// test's own `CONVEYOR_*`); exit code and stdout + stderr.
async fn conveyor(args: &[&str], vars: &[(String, String)]) -> (Option<i32>, String) {
    let mut cmd = tokio::process::Command::new(binary());
    cmd.args(args)
        .envs(vars.iter().cloned())
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .expect("conveyor exits within 60 s")
        .expect("run conveyor");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), text)
}

fn rabbit_user_name(env: &Env) -> String {
    format!("{}-user", env.name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_config_prints_no_secret() {
    let s = Secrets::new();
    let env = Env::new("secrets_check", Knobs::default()).await;
    let vars = secret_env(&s, &env, &rabbit_user_name(&env));

    let (code, out) = conveyor(&["check-config"], &vars).await;
    assert_eq!(code, Some(0), "{out}");
    s.assert_absent("check-config", &out);
    for shown in [
        "[redacted]",
        // What is not secret stays visible.
        "\"security.protocol\" = \"SASL_SSL\"",
        "\"sasl.username\" = \"conveyor\"",
        "http://conveyor:[redacted]@127.0.0.1",
        "amqp://ignored:[redacted]@127.0.0.1:5672/%2f",
        "password=[redacted]",
    ] {
        assert!(out.contains(shown), "{shown:?} missing from:\n{out}");
    }

    // Refused configurations show the values at fault, redacted.
    for (key, value) in [
        (
            "CONVEYOR__DATABASE__URL",
            format!(
                "postgres://u:{}@db:99999/x?password={}",
                s.get("bad-db-userinfo"),
                s.get("bad-db-query")
            ),
        ),
        (
            "CONVEYOR__PAYMENT__URL",
            format!("http://u:{}@pay ments", s.get("bad-payment")),
        ),
        (
            "CONVEYOR__RABBITMQ__URL",
            format!("amqp://u:{}@rabbit:0/%2f", s.get("bad-amqp")),
        ),
    ] {
        let mut bad = vars.clone();
        bad.push((key.to_string(), value));
        let (code, out) = conveyor(&["check-config"], &bad).await;
        assert_eq!(code, Some(78), "EX_CONFIG for {key}: {out}");
        assert!(out.contains("invalid configuration"), "{key}: {out}");
        s.assert_absent(&format!("check-config refusing {key}"), &out);
    }
    env.cleanup().await;
}

/// A short real run logging at `level` in `format`: orders through RabbitMQ (as the user whose
/// password is a secret), PostgreSQL and the simulator (behind basic auth
/// URLs), a `/metrics` scrape, a drain; then the log is searched.
async fn run_and_search(s: &Secrets, env: &Env, format: &str, level: &str) {
    let gen = OrderGen::new(format!("{}-{format}", env.name), Mix::default());
    let n = 20u64;
    env.publish((0..n).map(|i| gen.message(i).1)).await;
    let before = env.rows().await;

    let mut vars = secret_env(s, env, &rabbit_user_name(env));
    vars.push(("CONVEYOR__LOG__FORMAT".into(), format.into()));
    // Every library's debug (and, once, trace) lines too: an operator
    // chasing a problem turns them on, and secrets must not appear then
    // either.
    vars.push(("CONVEYOR__LOG__LEVEL".into(), level.into()));
    let extra: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let mut daemon = Daemon::start(env, &extra).await;
    wait_for("every order acked", Duration::from_secs(60), || async {
        metric(daemon.http, "conveyor_messages_acked_total").await == Some(n as f64)
    })
    .await;
    let scrape = reqwest::get(format!("http://{}/metrics", daemon.http))
        .await
        .expect("scrape")
        .text()
        .await
        .expect("metrics text");
    assert!(scrape.contains("conveyor_messages_acked_total"), "{scrape}");
    s.assert_absent("/metrics", &scrape);

    daemon.signal(Signal::SIGTERM);
    let (code, _) = daemon.wait(Duration::from_secs(30)).await;
    let log = daemon.log_text();
    assert_eq!(code, Some(0), "log:\n{log}");
    assert!(
        env.rows().await > before,
        "the run stored nothing; log:\n{log}"
    );
    assert!(
        log.contains("consuming from RabbitMQ"),
        "{format} log:\n{log}"
    );
    if format == "json" {
        assert!(log.lines().any(|l| l.starts_with('{')), "not JSON:\n{log}");
    }
    s.assert_absent(&format!("the {format} log"), &log);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_run_logs_and_exports_no_secret() {
    let s = Secrets::new();
    let env = Env::new("secrets_run", Knobs::default()).await;
    let user = RabbitUser::create(&rabbit_user_name(&env), &s.get("rabbit-file")).await;
    run_and_search(&s, &env, "pretty", "trace").await;
    run_and_search(&s, &env, "json", "debug").await;
    user.delete().await;
    env.cleanup().await;
}

/// librdkafka logs the part of a property it could not parse: here the
/// tail of `sasl.oauthbearer.config`, secret included, again and again
/// while the daemon runs. The log must show it scrubbed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kafka_error_quoting_a_property_is_scrubbed() {
    let s = Secrets::new();
    let db = s.dir.path().join("conveyor.db");
    let config = s.dir.path().join("kafka.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[source]
kind = "kafka"

[kafka]
brokers = "127.0.0.1:{port}"

[kafka.properties]
"security.protocol" = "SASL_PLAINTEXT"
"sasl.mechanisms" = "OAUTHBEARER"
"enable.sasl.oauthbearer.unsecure.jwt" = "true"
"sasl.oauthbearer.config" = "principal=conveyor bogus={secret} extension_a={secret}"

[database]
url = "sqlite://{db}"
"#,
            port = common::free_port(),
            secret = s.get("oauthbearer-config"),
            db = db.display()
        ),
    )
    .expect("write config");
    for format in ["pretty", "json"] {
        let log_path = s.dir.path().join(format!("kafka-{format}.log"));
        let log_file = std::fs::File::create(&log_path).expect("log file");
        let mut child = tokio::process::Command::new(binary())
            .arg("run")
            .env("CONVEYOR_CONFIG", &config)
            .env("CONVEYOR__LOG__FORMAT", format)
            .env(
                "CONVEYOR__HTTP__LISTEN",
                format!("127.0.0.1:{}", common::free_port()),
            )
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .kill_on_drop(true)
            .spawn()
            .expect("spawn conveyor");
        let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
        wait_for(
            "librdkafka's complaint about sasl.oauthbearer.config",
            Duration::from_secs(30),
            || async { log().contains("Unrecognized sasl.oauthbearer.config") },
        )
        .await;
        let pid = child.id().and_then(|p| i32::try_from(p).ok()).expect("pid");
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGTERM).expect("SIGTERM");
        let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
            .await
            .expect("exits after SIGTERM")
            .expect("wait");
        let text = log();
        assert!(status.code().is_some(), "{status:?}; log:\n{text}");
        assert!(
            text.contains("beginning at: [redacted]"),
            "{format} log:\n{text}"
        );
        s.assert_absent(&format!("the {format} log of a Kafka run"), &text);
    }
}
