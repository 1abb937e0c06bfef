//! Kafka over TLS against a real TLS endpoint: tansu behind a `socat` TLS
//! terminator that it advertises as its own address, so every connection
//! the client opens goes through TLS (tansu's own TLS listener did not
//! complete a handshake with librdkafka). Certificates come from a
//! throwaway CA made by the test. The typed keys `kafka.security.*` are
//! used, through the environment as an operator would.
//!
//! Each case prints one line of the TLS matrix:
//! `tls service=kafka case=<case> result=<connected|refused> message=<...>`.

mod common;

use std::time::Duration;

use common::daemon::free_port;
use common::tls::{Pki, Terminator};
use common::KafkaBroker;

/// `conveyor produce` with only `env` configured; (success, stderr).
async fn produce(env: &[(&str, String)], topic: &str) -> (bool, String) {
    let out = tokio::process::Command::new(common::binary())
        .args([
            "produce", "--to", "kafka", "--topic", topic, "--orders", "20", "--quiet",
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

fn matrix_line(case: &str, ok: bool, out: &str) {
    let lines: Vec<&str> = out.lines().collect();
    let message = lines
        .iter()
        .find(|l| l.contains("SSL handshake failed") || l.contains("certificate verify failed"))
        .or_else(|| {
            lines
                .iter()
                .rev()
                .find(|l| l.contains("rror") || l.contains("failed"))
        })
        .map(|l| l.trim())
        .unwrap_or("");
    println!(
        "tls service=kafka case={case} result={} message={message}",
        if ok { "connected" } else { "refused" }
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_over_tls_connects_with_the_right_ca_and_refuses_a_wrong_ca_or_host() {
    let pki = Pki::new();
    let (plain, tls, wrong_host) = (free_port(), free_port(), free_port());
    let broker = KafkaBroker::tansu_behind(plain, tls).await;
    let _front = Terminator::start(tls, &pki.path("server.pem"), plain).await;
    let _impostor = Terminator::start(wrong_host, &pki.path("wronghost.pem"), plain).await;
    let topic = format!("tls-{}", uuid::Uuid::new_v4().simple());
    let ca = pki.path("ca.pem").display().to_string();
    let other_ca = pki.path("other-ca.pem").display().to_string();
    let with = |brokers: u16, ca: &str| {
        vec![
            ("CONVEYOR__KAFKA__BROKERS", format!("127.0.0.1:{brokers}")),
            ("CONVEYOR__KAFKA__SECURITY__CA_FILE", ca.to_string()),
        ]
    };
    // The topic, created through TLS with the independent client.
    let tls_props = [
        ("security.protocol", "SSL"),
        ("ssl.ca.location", ca.as_str()),
    ];
    let tls_brokers = format!("127.0.0.1:{tls}");
    common::kafka::independent_write(
        &tls_brokers,
        &tls_props,
        &topic,
        "none",
        [("k".to_string(), "{}".to_string())],
    )
    .await;

    let (ok, out) = produce(&with(tls, &ca), &topic).await;
    matrix_line("good_ca", ok, &out);
    assert!(ok, "the right CA connects: {out}\n{}", broker.log_text());
    let got = common::kafka::independent_read(
        &tls_brokers,
        &tls_props,
        &topic,
        21,
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(
        got.len(),
        21,
        "what was produced through TLS reads back through TLS"
    );

    let (ok, out) = produce(&with(tls, &other_ca), &topic).await;
    matrix_line("wrong_ca", ok, &out);
    assert!(
        !ok,
        "a CA that did not sign the broker's certificate is refused"
    );
    assert!(
        out.contains("certificate verify failed"),
        "the error says why: {out}"
    );

    let (ok, out) = produce(&with(wrong_host, &ca), &topic).await;
    matrix_line("wrong_host", ok, &out);
    assert!(!ok, "a certificate for another host name is refused");
    assert!(
        out.contains("certificate verify failed"),
        "the error says why: {out}"
    );

    let mut plaintext = with(tls, &ca);
    plaintext.push(("CONVEYOR__KAFKA__SECURITY__PROTOCOL", "plaintext".into()));
    let (ok, out) = produce(&plaintext, &topic).await;
    matrix_line("plaintext_to_tls", ok, &out);
    assert!(!ok, "plaintext to a TLS port does not connect");
}

/// The SASL password given as a typed key never shows: not in
/// `check-config`, not in what a failing `produce` prints.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sasl_password_never_shows() {
    let secret = "s3cret-kafka-pw-4711";
    let env = [
        (
            "CONVEYOR__KAFKA__BROKERS",
            format!("127.0.0.1:{}", free_port()),
        ),
        (
            "CONVEYOR__KAFKA__SECURITY__SASL_MECHANISM",
            "SCRAM-SHA-512".to_string(),
        ),
        ("CONVEYOR__KAFKA__SECURITY__USERNAME", "alice".to_string()),
        ("CONVEYOR__KAFKA__SECURITY__PASSWORD", secret.to_string()),
    ];
    let out = tokio::process::Command::new(common::binary())
        .arg("check-config")
        .env_remove("RUST_LOG")
        .envs(env.iter().map(|(k, v)| (k.to_string(), v.clone())))
        .output()
        .await
        .expect("run check-config");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("SCRAM-SHA-512"),
        "the settings are shown: {text}"
    );
    assert!(
        !text.contains(secret),
        "check-config shows the password: {text}"
    );
    let (ok, out) = produce(&env, "nope").await;
    assert!(!ok);
    assert!(!out.contains(secret), "produce shows the password: {out}");
}
