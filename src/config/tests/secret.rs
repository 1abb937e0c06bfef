//! Secrets: never shown in `Debug`, TOML or an error, scrubbed from logs,
//! read from files.

use super::{env, rejection};
use crate::config::*;

#[test]
fn kafka_security_keys_map_to_librdkafka_and_the_password_is_never_shown() {
    let mut c = Config::default();
    c.kafka.security.ca_file = Some("/etc/ca.pem".into());
    c.kafka.security.sasl_mechanism = Some("SCRAM-SHA-512".into());
    c.kafka.security.username = Some("alice".into());
    c.kafka.security.password = Some(Secret::new("hunter2-kafka"));
    c.validate().expect("valid");
    let props = c.kafka.security.librdkafka_properties();
    for want in [
        ("security.protocol", "sasl_ssl"),
        ("ssl.ca.location", "/etc/ca.pem"),
        ("sasl.mechanism", "SCRAM-SHA-512"),
        ("sasl.username", "alice"),
        ("sasl.password", "hunter2-kafka"),
    ] {
        assert!(
            props.iter().any(|(k, v)| (*k, v.as_str()) == want),
            "{want:?} in {props:?}"
        );
    }
    let shown = format!("{c:?}\n{}", toml::to_string(&c).expect("toml"));
    assert!(!shown.contains("hunter2-kafka"), "{shown}");
    assert!(c.scrubber().scrub("pw hunter2-kafka").contains(REDACTED));
    c.kafka.security.sasl_mechanism = Some("GSSAPI".into());
    let err = c.validate().expect_err("GSSAPI is not built in");
    assert!(
        err.to_string().contains("kafka.security.sasl_mechanism"),
        "{err}"
    );
}

#[test]
fn url_errors_never_show_the_password() {
    for (var, value) in [
        ("CONVEYOR__PAYMENT__URL", "http://u:Pw-Sec1@pay ments"),
        ("CONVEYOR__DATABASE__URL", "postgres://u:Pw-Sec1@db:99999/x"),
        (
            "CONVEYOR__DATABASE__URL",
            "postgres://u@db:99999/x?password=Pw-Sec1",
        ),
        (
            "CONVEYOR__DATABASE__URL",
            "postgres://u@db/x?password=Pw-Sec1&sslmode=sure",
        ),
        ("CONVEYOR__RABBITMQ__URL", "amqp://u:Pw-Sec1@"),
    ] {
        let text = rejection(var, value);
        assert!(!text.contains("Pw-Sec1"), "{var}: {text}");
        assert!(text.contains(REDACTED), "{var}: {text}");
    }
}

#[test]
fn secret_names() {
    for secret in [
        "sasl.password",
        "sasl.oauthbearer.config",
        "sasl.oauthbearer.client.secret",
        "sasl.jaas.config",
        "ssl.key.password",
        "ssl.keystore.password",
        "ssl.key.pem",
        "ssl_key",
        "sasl.oauthbearer.assertion.private.key.pem",
        "sasl.oauthbearer.assertion.private.key.passphrase",
        "password",
        "sslpassword",
        "api_key",
        "access_token",
    ] {
        assert!(is_secret_name(secret), "{secret}");
    }
    for plain in [
        "security.protocol",
        "sasl.mechanism",
        "sasl.username",
        "ssl.key.location",
        "ssl.keystore.location",
        "ssl.ca.location",
        "ssl.certificate.pem",
        "ssl.ca.pem",
        "session.timeout.ms",
        "sslmode",
        "sslrootcert",
        "host",
    ] {
        assert!(!is_secret_name(plain), "{plain}");
    }
}

#[test]
fn urls_are_redacted_wherever_their_secrets_sit() {
    for (raw, shown) in [
        (
            "postgres://app:pw@db:5432/orders",
            "postgres://app:[redacted]@db:5432/orders",
        ),
        (
            "postgres://app@db/orders?sslmode=require&password=pw",
            "postgres://app@db/orders?sslmode=require&password=[redacted]",
        ),
        (
            "postgres://app:pw@db/orders?sslpassword=pw#x",
            "postgres://app:[redacted]@db/orders?sslpassword=[redacted]#x",
        ),
        (
            "amqp://guest:pw@rabbit/%2f",
            "amqp://guest:[redacted]@rabbit/%2f",
        ),
        (
            "https://u:p%40w@pay.example.com/",
            "https://u:[redacted]@pay.example.com/",
        ),
        ("http://u@pay.example.com", "http://u@pay.example.com"),
        ("sqlite:data/x.db?mode=rwc", "sqlite:data/x.db?mode=rwc"),
        // Not URLs: whatever might be credentials, and the query, hidden.
        (
            "postgres://app:pw@db:99999/x",
            "postgres://[redacted]@db:99999/x",
        ),
        (
            "http://u:pw@x:99999?password=pw",
            "http://[redacted]@x:99999?[redacted]",
        ),
        ("http://a b:pw@x", "http://a%20b:[redacted]@x/"),
    ] {
        assert_eq!(redact_url(raw), shown, "{raw}");
    }
}

#[test]
fn debug_and_toml_redact_every_secret() {
    let mut cfg = Config::default();
    let secret = "Sec-7f3a";
    cfg.database.url = format!("postgres://app:{secret}@db/x?password={secret}");
    cfg.database.password = Some(Secret::new(secret));
    cfg.rabbitmq.url = format!("amqp://guest:{secret}@rabbit/%2f");
    cfg.rabbitmq.password = Some(Secret::new(secret));
    cfg.payment.url = format!("https://u:{secret}@pay.example.com");
    cfg.rule_engine.url = format!("https://u:{secret}@rules.example.com");
    for key in ["sasl.password", "sasl.oauthbearer.config", "ssl.key.pem"] {
        cfg.kafka
            .properties
            .insert(key.into(), format!("x={secret} y"));
    }
    let shown = format!("{cfg:?}\n{cfg:#?}\n{}", cfg.to_redacted_toml());
    assert!(!shown.contains(secret), "{shown}");
    assert!(
        shown.contains("https://u:[redacted]@pay.example.com"),
        "{shown}"
    );
    let scrubbed = cfg
        .scrubber()
        .scrub(&format!("refused {secret:?} for ssl.key.pem"));
    assert_eq!(scrubbed, "refused \"[redacted]\" for ssl.key.pem");
    // Escaped as JSON and Debug show it.
    cfg.kafka
        .properties
        .insert("sasl.oauthbearer.config".into(), "a=\"q\\".into());
    let scrubber = cfg.scrubber();
    assert_eq!(
        scrubber.scrub(r#"{"e":"x a=\"q\\ y"}"#),
        r#"{"e":"x [redacted] y"}"#
    );
    #[derive(Clone, Default)]
    struct Shared(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
    impl std::io::Write for Shared {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("lock").extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let out = Shared::default();
    let sink = out.clone();
    let make = scrubber.writer(move || sink.clone());
    std::io::Write::write_all(&mut make(), format!("oops {secret}\n").as_bytes()).expect("write");
    let written = out.0.lock().expect("lock").clone();
    assert_eq!(String::from_utf8_lossy(&written), "oops [redacted]\n");
}

#[test]
fn secrets_never_print() {
    let mut cfg = Config::default();
    cfg.database.password = Some(Secret::new("hunter2"));
    cfg.database.url = "postgres://app:inline-pw@db:5432/orders".into();
    let shown = format!("{cfg:?}\n{}", cfg.to_redacted_toml());
    assert!(!shown.contains("hunter2"), "{shown}");
    assert!(!shown.contains("inline-pw"), "{shown}");
    assert!(
        shown.contains("postgres://app:[redacted]@db:5432/orders"),
        "{shown}"
    );
}

#[test]
fn kafka_secret_properties_are_redacted() {
    let mut cfg = Config::default();
    cfg.kafka
        .properties
        .insert("sasl.password".into(), "hunter2".into());
    cfg.kafka
        .properties
        .insert("security.protocol".into(), "SASL_SSL".into());
    let shown = cfg.to_redacted_toml();
    assert!(!shown.contains("hunter2"), "{shown}");
    assert!(shown.contains("SASL_SSL"), "{shown}");
}

#[test]
fn secret_file_wins_and_is_trimmed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("pw");
    std::fs::write(&path, "s3cret\n").expect("write");
    let got =
        resolve_secret("database.password", &Some(Secret::new("x")), &Some(path)).expect("reads");
    assert_eq!(got.as_ref().map(Secret::expose), Some("s3cret"));
    let err = resolve_secret(
        "database.password",
        &None,
        &Some(dir.path().join("missing")),
    )
    .expect_err("missing file");
    assert_eq!(err.key, "database.password_file");
}

#[test]
fn otlp_headers_are_secrets_and_bad_values_name_their_key() {
    let cfg = Config::load_with_env(
        None,
        Some(env(&[
            (
                "CONVEYOR__TELEMETRY__OTLP__ENDPOINT",
                "http://collector:4318",
            ),
            ("CONVEYOR__TELEMETRY__OTLP__SAMPLE_RATIO", "0.25"),
            (
                "CONVEYOR__TELEMETRY__OTLP__HEADERS__X-API-KEY",
                "hunter2-otlp",
            ),
        ])),
    )
    .expect("valid");
    let otlp = &cfg.telemetry.otlp;
    assert_eq!(otlp.endpoint.as_deref(), Some("http://collector:4318"));
    assert_eq!(otlp.sample_ratio, Some(0.25));
    assert_eq!(
        otlp.headers.get("x-api-key").map(Secret::expose),
        Some("hunter2-otlp")
    );
    let shown = cfg.to_redacted_toml();
    assert!(!shown.contains("hunter2-otlp"), "{shown}");
    assert!(shown.contains("[redacted]"), "{shown}");
    assert_eq!(cfg.scrubber().scrub("key hunter2-otlp"), "key [redacted]");

    let mut bad = Config::default();
    bad.telemetry.otlp.endpoint = Some("collector:4318".into());
    bad.telemetry.otlp.protocol = "grpc".into();
    bad.telemetry.otlp.sample_ratio = Some(1.5);
    bad.telemetry.otlp.batch_size = bad.telemetry.otlp.queue_size + 1;
    let Err(ConfigError::Invalid(errors)) = bad.validate() else {
        panic!("invalid OTLP settings accepted");
    };
    let keys: Vec<&str> = errors.iter().map(|e| e.key.as_str()).collect();
    for key in [
        "telemetry.otlp.endpoint",
        "telemetry.otlp.protocol",
        "telemetry.otlp.sample_ratio",
        "telemetry.otlp.batch_size",
    ] {
        assert!(keys.contains(&key), "{key} not in {keys:?}");
    }
}
