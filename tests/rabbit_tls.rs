//! RabbitMQ over TLS (`amqps://`, rustls) against a real TLS endpoint: the
//! local broker behind a `socat` TLS terminator, with certificates from a
//! throwaway CA made by the test. Keys given through the environment as an
//! operator would: `rabbitmq.url`, `rabbitmq.tls.ca_file`,
//! `rabbitmq.tls.cert_file`, `rabbitmq.tls.key_file`.
//!
//! Each case prints one line of the TLS matrix:
//! `tls service=rabbitmq case=<case> result=<connected|refused> message=<...>`.

mod common;

use std::time::Duration;

use common::daemon::free_port;
use common::tls::{Pki, Terminator};
use common::{wait_for, Daemon, Env};
use conveyor::tools::sim::Knobs;
use nix::sys::signal::Signal;

/// `conveyor produce --to rabbitmq` with `env`; (success, output).
async fn produce(env: &[(&str, String)]) -> (bool, String) {
    let out = tokio::process::Command::new(common::binary())
        .args([
            "produce",
            "--to",
            "rabbitmq",
            "--orders",
            "20",
            "--poison-pct",
            "0",
            "--quiet",
        ])
        .env_remove("RUST_LOG")
        .envs(env.iter().map(|(k, v)| (k.to_string(), v.clone())))
        .output()
        .await
        .expect("run conveyor produce");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn matrix_line(case: &str, ok: bool, out: &str) {
    let message = out
        .lines()
        .rev()
        .find(|l| l.contains("rabbitmq.") || l.contains("TLS") || l.contains("rror"))
        .map(str::trim)
        .unwrap_or("");
    println!(
        "tls service=rabbitmq case={case} result={} message={message}",
        if ok { "connected" } else { "refused" }
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqps_connects_with_the_right_ca_and_refuses_a_wrong_ca_host_or_missing_client_cert() {
    let env = Env::new("rabbittls", Knobs::default()).await;
    let pki = Pki::new();
    let (tls, wrong_host, mutual) = (free_port(), free_port(), free_port());
    let _front = Terminator::start(tls, &pki.path("server.pem"), 5672).await;
    let _impostor = Terminator::start(wrong_host, &pki.path("wronghost.pem"), 5672).await;
    let _mutual = Terminator::start_with(
        mutual,
        &pki.path("server.pem"),
        Some(&pki.path("ca.pem")),
        5672,
    )
    .await;
    let file = |name: &str| pki.path(name).display().to_string();
    let with = |port: u16, ca: &str| {
        vec![
            ("CONVEYOR__RABBITMQ__QUEUE", env.queue.clone()),
            (
                "CONVEYOR__RABBITMQ__URL",
                format!("amqps://127.0.0.1:{port}/%2f"),
            ),
            ("CONVEYOR__RABBITMQ__TLS__CA_FILE", file(ca)),
        ]
    };

    let (ok, out) = produce(&with(tls, "ca.pem")).await;
    matrix_line("good_ca", ok, &out);
    assert!(ok, "the right CA connects: {out}");

    // The daemon consumes through TLS too.
    let daemon_env: Vec<(&str, String)> = with(tls, "ca.pem");
    let extra: Vec<(&str, &str)> = daemon_env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut daemon = Daemon::start(&env, &extra).await;
    wait_for(
        "the orders produced through TLS stored",
        Duration::from_secs(30),
        || async { env.rows().await == 20 },
    )
    .await;
    daemon.signal(Signal::SIGTERM);
    let (code, _) = daemon.wait(Duration::from_secs(20)).await;
    assert_eq!(code, Some(0), "{}", daemon.log_text());

    let (ok, out) = produce(&with(tls, "other-ca.pem")).await;
    matrix_line("wrong_ca", ok, &out);
    assert!(
        !ok,
        "a CA that did not sign the broker's certificate is refused"
    );
    assert!(
        out.contains("rabbitmq.tls.ca_file") && out.contains("UnknownIssuer"),
        "the error names the key and says why: {out}"
    );

    let (ok, out) = produce(&with(wrong_host, "ca.pem")).await;
    matrix_line("wrong_host", ok, &out);
    assert!(!ok, "a certificate for another host name is refused");
    assert!(
        out.contains("NotValidForName") || out.contains("not valid for"),
        "the error says why: {out}"
    );

    let (ok, out) = produce(&with(mutual, "ca.pem")).await;
    matrix_line("no_client_cert", ok, &out);
    assert!(!ok, "a broker that wants a client certificate refuses none");
    assert!(
        out.contains("rabbitmq.tls.cert_file"),
        "the error says which keys to set: {out}"
    );

    let mut client = with(mutual, "ca.pem");
    client.push(("CONVEYOR__RABBITMQ__TLS__CERT_FILE", file("client.crt")));
    client.push(("CONVEYOR__RABBITMQ__TLS__KEY_FILE", file("client.key")));
    let (ok, out) = produce(&client).await;
    matrix_line("client_cert", ok, &out);
    assert!(ok, "the client certificate is presented: {out}");

    let mut plain = with(tls, "ca.pem");
    plain[1].1 = format!("amqp://127.0.0.1:{tls}/%2f");
    let (ok, out) = produce(&plain).await;
    matrix_line("tls_keys_on_amqp_url", ok, &out);
    assert!(!ok);
    assert!(
        out.contains("rabbitmq.tls.ca_file") && out.contains("not amqps://"),
        "TLS keys on a plaintext URL are refused at start: {out}"
    );
    env.cleanup().await;
}
