//! Kafka SASL against a real SASL broker: tansu with `--authentication`.
//!
//! What tansu 0.6.0 (the prebuilt, memory-only build) allows here: it
//! answers SCRAM-SHA-256 and SCRAM-SHA-512 logins, and offers no PLAIN.
//! Its users live in its storage, and `tansu user create` connects without
//! authenticating, which an authenticating broker refuses
//! (`NotAuthenticated`); a broker started without `--authentication`
//! accepts the user but then refuses every SASL handshake
//! (`UnsupportedSaslMechanism`), and memory storage does not outlive the
//! process. So no login can succeed: what is tested is that a refused
//! login fails saying so, by mechanism, for `produce` and for the daemon
//! (which stays up, `/readyz` answering 503 with the broker's refusal), and
//! that the password never shows in
//! what either prints, in `/readyz` or in `/metrics`.
//!
//! Each case prints one line of the TLS matrix:
//! `sasl service=kafka case=<case> result=<connected|refused> message=<...>`.

mod common;

use std::time::{Duration, Instant};

use common::{Env, KafkaBroker};
use conveyor::tools::sim::Knobs;

/// The SASL keys for `mechanism`, the password given inline.
fn sasl(brokers: &str, mechanism: &str, password: &str) -> Vec<(&'static str, String)> {
    vec![
        ("CONVEYOR__KAFKA__BROKERS", brokers.to_string()),
        (
            "CONVEYOR__KAFKA__SECURITY__SASL_MECHANISM",
            mechanism.to_string(),
        ),
        ("CONVEYOR__KAFKA__SECURITY__USERNAME", "alice".to_string()),
        ("CONVEYOR__KAFKA__SECURITY__PASSWORD", password.to_string()),
    ]
}

/// `conveyor produce` with `env`; (success, everything it printed).
async fn produce(env: &[(&str, String)], topic: &str) -> (bool, String) {
    let out = tokio::process::Command::new(common::binary())
        .args([
            "produce", "--to", "kafka", "--topic", topic, "--orders", "5", "--quiet",
        ])
        .env_remove("RUST_LOG")
        .envs(env.iter().map(|(k, v)| (k.to_string(), v.clone())))
        .output()
        .await
        .expect("run conveyor produce");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn matrix_line(case: &str, ok: bool, out: &str, said: &str) {
    let message = out
        .lines()
        .find(|l| l.contains(said))
        .map(|l| l.trim())
        .unwrap_or("");
    println!(
        "sasl service=kafka case={case} result={} message={message}",
        if ok { "connected" } else { "refused" }
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_sasl_logins_say_so_and_never_show_the_password() {
    let broker = KafkaBroker::tansu_authenticating().await;
    let brokers = broker.bootstrap_servers();
    let secret = "s3cret-sasl-pw-0815";
    for mechanism in ["SCRAM-SHA-256", "SCRAM-SHA-512"] {
        let (ok, out) = produce(&sasl(&brokers, mechanism, secret), "sasl-orders").await;
        let said = "SASL SCRAM authentication failed";
        matrix_line(&mechanism.to_lowercase(), ok, &out, said);
        assert!(
            !ok,
            "{mechanism}: a user the broker does not know is refused"
        );
        assert!(
            out.contains(said) && out.contains("unknown-user"),
            "{mechanism}: the error says why: {out}"
        );
        assert!(!out.contains(secret), "produce shows the password: {out}");
    }
    let (ok, out) = produce(&sasl(&brokers, "PLAIN", secret), "sasl-orders").await;
    let said = "SASL PLAIN mechanism handshake failed";
    matrix_line("plain", ok, &out, said);
    assert!(!ok, "tansu offers no PLAIN");
    assert!(out.contains(said), "the error says why: {out}");
    assert!(!out.contains(secret), "produce shows the password: {out}");
    assert!(
        !broker.log_text().contains(secret),
        "SCRAM never sends the password, and PLAIN stopped at the handshake"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_refused_by_sasl_stays_unready_and_never_shows_the_password() {
    let env = Env::new("kafkasasl", Knobs::default()).await;
    let broker = KafkaBroker::tansu_authenticating().await;
    let secret = "s3cret-sasl-daemon-pw-4242";
    // The `*_file` variant, as an operator mounting a secret would.
    let password_file = std::env::temp_dir().join(format!("{}-kafka-password", env.name));
    std::fs::write(&password_file, format!("{secret}\n")).expect("write the password file");
    let port = common::free_port();
    let log = std::env::temp_dir().join(format!("{}-{port}.log", env.name));
    let mut daemon = tokio::process::Command::new(common::binary())
        .arg("run")
        .envs(env.env_vars(port))
        .envs([
            ("CONVEYOR__SOURCE__KIND", "kafka".to_string()),
            ("CONVEYOR__KAFKA__BROKERS", broker.bootstrap_servers()),
            ("CONVEYOR__KAFKA__GROUP_ID", format!("{}-group", env.name)),
            ("CONVEYOR__KAFKA__TOPICS", format!("{}-orders", env.name)),
            ("CONVEYOR__KAFKA__LAG_INTERVAL", "1s".to_string()),
            (
                "CONVEYOR__KAFKA__SECURITY__SASL_MECHANISM",
                "SCRAM-SHA-512".to_string(),
            ),
            ("CONVEYOR__KAFKA__SECURITY__USERNAME", "alice".to_string()),
            (
                "CONVEYOR__KAFKA__SECURITY__PASSWORD_FILE",
                password_file.display().to_string(),
            ),
        ])
        .env_remove("RUST_LOG")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log file"))
        .kill_on_drop(true)
        .spawn()
        .expect("spawn conveyor run");
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
    let said = "SASL SCRAM authentication failed";
    let deadline = Instant::now() + Duration::from_secs(30);
    while !log_text().contains(said) {
        assert!(
            Instant::now() < deadline,
            "no SASL failure logged in 30 s; log:\n{}",
            log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let http = common::http();
    let readyz = http
        .get(format!("http://127.0.0.1:{port}/readyz"))
        .send()
        .await
        .expect("/readyz answers");
    let status = readyz.status();
    let why = readyz.text().await.unwrap_or_default();
    assert_eq!(status.as_u16(), 503, "not ready while refused: {why}");
    assert!(
        why.contains("refused authentication") && why.contains("SASL SCRAM authentication failed"),
        "/readyz says why: {why}"
    );
    let refused = common::metric(
        format!("127.0.0.1:{port}").parse().expect("addr"),
        "conveyor_kafka_consumer_errors_total{code=\"Authentication\"}",
    )
    .await;
    assert!(refused.unwrap_or(0.0) >= 1.0, "counted: {refused:?}");
    let metrics = http
        .get(format!("http://127.0.0.1:{port}/metrics"))
        .send()
        .await
        .expect("/metrics answers")
        .text()
        .await
        .expect("/metrics body");
    println!("sasl service=kafka case=daemon_scram-sha-512 result=refused readyz={why:?}");
    assert!(!why.contains(secret), "/readyz shows the password: {why}");
    assert!(!metrics.contains(secret), "/metrics shows the password");
    let pid =
        nix::unistd::Pid::from_raw(i32::try_from(daemon.id().expect("running")).expect("pid fits"));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
    let status = tokio::time::timeout(Duration::from_secs(30), daemon.wait())
        .await
        .expect("drains within 30 s")
        .expect("exit status");
    let text = log_text();
    assert!(status.success(), "exits 0 after SIGTERM; log:\n{text}");
    assert!(
        !text.contains(secret),
        "the log shows the password:\n{text}"
    );
    let _ = std::fs::remove_file(&password_file);
    let _ = std::fs::remove_file(&log);
    env.cleanup().await;
}
