//! Validation: values that cannot work are refused, naming the key and the
//! allowed range or form.

use super::{env, rejection};
use crate::config::*;

#[test]
fn quorum_and_tls_keys_are_checked_with_their_names() {
    let mut c = Config::default();
    c.rabbitmq.queue_type = QueueType::Quorum;
    c.rabbitmq.delivery_limit = 3;
    c.source.max_deliveries = 5;
    let err = c
        .validate()
        .expect_err("the broker would act first")
        .to_string();
    assert!(err.contains("rabbitmq.delivery_limit"), "{err}");
    c.rabbitmq.delivery_limit = 5;
    c.validate().expect("a limit at max_deliveries is fine");

    let dir = tempfile::tempdir().expect("tempdir");
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, "-----BEGIN CERTIFICATE-----\n").expect("write");
    c.rabbitmq.tls.ca_file = Some(ca.clone());
    let err = c.validate().expect_err("TLS keys need amqps").to_string();
    assert!(
        err.contains("rabbitmq.tls.ca_file") && err.contains("amqps"),
        "{err}"
    );
    c.rabbitmq.url = "amqps://broker.example:5671/%2f".into();
    c.validate().expect("amqps with a CA file");
    c.rabbitmq.tls.cert_file = Some(ca);
    let err = c
        .validate()
        .expect_err("a certificate needs its key")
        .to_string();
    assert!(err.contains("rabbitmq.tls.key_file"), "{err}");
    c.rabbitmq.tls.key_file = Some(dir.path().join("missing.key"));
    let err = c.validate().expect_err("an unreadable key").to_string();
    assert!(err.contains("rabbitmq.tls.key_file: cannot read"), "{err}");

    c.source.max_deliveries = 1001;
    let err = c.validate().expect_err("out of range").to_string();
    assert!(err.contains("source.max_deliveries"), "{err}");
}

#[test]
fn errors_name_the_key_and_the_range() {
    let err = Config::load_with_env(
        None,
        Some(env(&[
            ("CONVEYOR__SOURCE__PREFETCH", "0"),
            ("CONVEYOR__BATCH__WRITERS", "100"),
        ])),
    )
    .expect_err("invalid");
    let text = err.to_string();
    assert!(
        text.contains("source.prefetch: must be in 1..=65535, got 0"),
        "{text}"
    );
    assert!(
        text.contains("batch.writers: must be in 1..=64, got 100"),
        "{text}"
    );
}

#[test]
fn breaker_errors_name_the_key_and_the_range() {
    let err = Config::load_with_env(
        None,
        Some(env(&[
            ("CONVEYOR__PAYMENT__BREAKER__FAILURE_RATE", "0"),
            ("CONVEYOR__PAYMENT__BREAKER__WINDOW", "10ms"),
            ("CONVEYOR__PAYMENT__BREAKER__MIN_CALLS", "0"),
            ("CONVEYOR__PAYMENT__BREAKER__HALF_OPEN_PROBES", "0"),
            ("CONVEYOR__PAYMENT__BREAKER__OPEN_FOR", "0s"),
            ("CONVEYOR__RULE_ENGINE__BREAKER__FAILURE_RATE", "1.5"),
            ("CONVEYOR__RULE_ENGINE__BREAKER__HALF_OPEN_PROBES", "1"),
        ])),
    )
    .expect_err("invalid");
    let text = err.to_string();
    for want in [
        "payment.breaker.failure_rate: must be in (0, 1] (above 0, at most 1), got 0",
        "payment.breaker.window: must be in 100ms..=1h, got 10ms",
        "payment.breaker.min_calls: must be in 1..=1000000, got 0",
        "payment.breaker.half_open_probes: must be in 1..=1000, got 0",
        "payment.breaker.open_for: must be in 1ms..=1h, got 0s",
        "rule_engine.breaker.failure_rate: must be in (0, 1] (above 0, at most 1), got 1.5",
        // The default half_open_successes (2) cannot exceed one probe.
        "rule_engine.breaker.half_open_successes: must be in 1..=1 \
         (at most breaker.half_open_probes), got 2",
    ] {
        assert!(text.contains(want), "missing {want:?} in:\n{text}");
    }
    let ok = Config::load_with_env(
        None,
        Some(env(&[
            ("CONVEYOR__PAYMENT__BREAKER__FAILURE_RATE", "1"),
            ("CONVEYOR__PAYMENT__BREAKER__WINDOW", "100ms"),
            ("CONVEYOR__PAYMENT__BREAKER__MIN_CALLS", "1"),
            ("CONVEYOR__PAYMENT__BREAKER__HALF_OPEN_PROBES", "1"),
            ("CONVEYOR__PAYMENT__BREAKER__HALF_OPEN_SUCCESSES", "1"),
        ])),
    );
    assert!(ok.is_ok(), "{:?}", ok.err());
}

#[test]
fn the_old_count_window_is_refused_naming_the_key_and_its_replacement() {
    for source in ["env", "file"] {
        let err = match source {
            "env" => Config::load_with_env(
                None,
                Some(env(&[("CONVEYOR__PAYMENT__BREAKER__WINDOW", "20")])),
            ),
            _ => {
                let dir = tempfile::tempdir().expect("tempdir");
                let path = dir.path().join("conveyor.toml");
                std::fs::write(&path, "[rule_engine.breaker]\nwindow = 20\n").expect("write");
                Config::load_with_env(Some(&path), Some(env(&[])))
            }
        }
        .expect_err("a count window");
        let text = err.to_string();
        let key = if source == "env" {
            "payment.breaker.window"
        } else {
            "rule_engine.breaker.window"
        };
        for want in [
            "a count of calls (20) is no longer accepted",
            "a time span such as \"10s\"",
            "breaker.min_calls",
            key,
        ] {
            assert!(text.contains(want), "{source}: missing {want:?} in: {text}");
        }
    }
    let err = Config::load_with_env(
        None,
        Some(env(&[(
            "CONVEYOR__PAYMENT__BREAKER__WINDOW",
            "ten seconds",
        )])),
    )
    .expect_err("not a span");
    assert!(err.to_string().contains("payment.breaker.window"), "{err}");
}

#[test]
fn urls_that_cannot_work_are_refused_naming_the_key() {
    for (var, value, want) in [
        (
            "CONVEYOR__PAYMENT__URL",
            "http://",
            "payment.url: must be an http:// or https:// base URL with a host, \
             http[s]://HOST[:PORT][/PATH] (port in 1..=65535), got \"http://\": empty host",
        ),
        (
            "CONVEYOR__PAYMENT__URL",
            "http://sim:99999",
            "payment.url: ",
        ),
        ("CONVEYOR__PAYMENT__URL", "http://sim:0", "port 0"),
        (
            "CONVEYOR__PAYMENT__URL",
            "http://pay ments:80",
            "whitespace",
        ),
        ("CONVEYOR__PAYMENT__URL", "ftp://sim", "scheme \"ftp\""),
        ("CONVEYOR__PAYMENT__URL", "sim:8080", "payment.url: "),
        ("CONVEYOR__PAYMENT__URL", "http://sim/?a=1", "?query"),
        (
            "CONVEYOR__RULE_ENGINE__URL",
            "https://:443",
            "rule_engine.url: ",
        ),
        ("CONVEYOR__RULE_ENGINE__URL", "", "rule_engine.url: "),
        ("CONVEYOR__RULE_ENGINE__URL", "http://a\tb", "whitespace"),
        ("CONVEYOR__RABBITMQ__URL", "amqp://", "rabbitmq.url: "),
        (
            "CONVEYOR__RABBITMQ__URL",
            "amqp://rabbit:65536/%2f",
            "rabbitmq.url: ",
        ),
        (
            "CONVEYOR__RABBITMQ__URL",
            "amqp://rab bit/%2f",
            "rabbitmq.url: ",
        ),
        (
            "CONVEYOR__RABBITMQ__URL",
            "http://rabbit/",
            "rabbitmq.url: ",
        ),
        ("CONVEYOR__DATABASE__URL", "postgres://", "database.url: "),
        ("CONVEYOR__DATABASE__URL", "postgres:///db", "no host"),
        (
            "CONVEYOR__DATABASE__URL",
            "postgres://db:70000/x",
            "database.url: ",
        ),
        (
            "CONVEYOR__DATABASE__URL",
            "postgres://d b/x",
            "database.url: ",
        ),
        (
            "CONVEYOR__DATABASE__URL",
            "postgres://db/x?sslmode=sure",
            "database.url: ",
        ),
        (
            "CONVEYOR__DATABASE__URL",
            "postgres://db/x?sslpassword=pw",
            "unknown query parameter \"sslpassword\"",
        ),
        ("CONVEYOR__DATABASE__URL", "sqlite:", "no file"),
        ("CONVEYOR__DATABASE__URL", "sqlite://", "no file"),
        ("CONVEYOR__KAFKA__BROKERS", "", "kafka.brokers: "),
        ("CONVEYOR__KAFKA__BROKERS", "k1:9092,", "an empty entry"),
        (
            "CONVEYOR__KAFKA__BROKERS",
            "k1:9092,k2:99999",
            "entry \"k2:99999\"",
        ),
        ("CONVEYOR__KAFKA__BROKERS", "k 1:9092", "kafka.brokers: "),
        ("CONVEYOR__KAFKA__BROKERS", "k1:0", "port 0"),
        (
            "CONVEYOR__KAFKA__BROKERS",
            "http://k1:9092",
            "protocol \"http\"",
        ),
        ("CONVEYOR__KAFKA__BROKERS", "k1:9092/x", "only HOST[:PORT]"),
    ] {
        let text = rejection(var, value);
        assert!(
            text.contains(want),
            "{var}={value:?}: want {want:?} in:\n{text}"
        );
    }
}

#[test]
fn urls_that_work_still_pass() {
    for (var, value) in [
        ("CONVEYOR__PAYMENT__URL", "http://127.0.0.1:8080"),
        ("CONVEYOR__PAYMENT__URL", "https://pay.example.com/api/v2/"),
        ("CONVEYOR__PAYMENT__URL", "https://user:pw@pay.example.com"),
        ("CONVEYOR__RULE_ENGINE__URL", "http://[::1]:65535"),
        (
            "CONVEYOR__RABBITMQ__URL",
            "amqps://rabbit.example.com/orders",
        ),
        (
            "CONVEYOR__RABBITMQ__URL",
            "amqp://[::1]:5672/%2f?heartbeat=10",
        ),
        (
            "CONVEYOR__DATABASE__URL",
            "postgres://app@db.example.com:5432/orders?sslmode=verify-full",
        ),
        (
            "CONVEYOR__DATABASE__URL",
            "postgres:///orders?host=/run/postgresql",
        ),
        ("CONVEYOR__DATABASE__URL", "sqlite::memory:"),
        (
            "CONVEYOR__KAFKA__BROKERS",
            "k1:9092, k2:9093,SASL_SSL://k3:9094",
        ),
        ("CONVEYOR__KAFKA__BROKERS", "kafka.example.com"),
    ] {
        let got = Config::load_with_env(None, Some(env(&[(var, value)])));
        assert!(
            got.is_ok(),
            "{var}={value:?}: {}",
            got.err().map_or(String::new(), |e| e.to_string())
        );
    }
}

#[test]
fn durations_that_cannot_work_are_refused_naming_the_key() {
    for (var, key) in [
        (
            "CONVEYOR__PAYMENT__RETRY__MAX_ELAPSED",
            "payment.retry.max_elapsed",
        ),
        (
            "CONVEYOR__RULE_ENGINE__RETRY__MAX_ELAPSED",
            "rule_engine.retry.max_elapsed",
        ),
        (
            "CONVEYOR__DATABASE__ACQUIRE_TIMEOUT",
            "database.acquire_timeout",
        ),
        (
            "CONVEYOR__PAYMENT__BREAKER__NOT_READY_AFTER",
            "payment.breaker.not_ready_after",
        ),
        (
            "CONVEYOR__RULE_ENGINE__BREAKER__NOT_READY_AFTER",
            "rule_engine.breaker.not_ready_after",
        ),
        ("CONVEYOR__PAYMENT__TIMEOUT", "payment.timeout"),
        (
            "CONVEYOR__PAYMENT__RETRY__INITIAL_INTERVAL",
            "payment.retry.initial_interval",
        ),
        ("CONVEYOR__KAFKA__COMMIT_INTERVAL", "kafka.commit_interval"),
        ("CONVEYOR__KAFKA__REVOKE_TIMEOUT", "kafka.revoke_timeout"),
        ("CONVEYOR__KAFKA__LAG_INTERVAL", "kafka.lag_interval"),
        ("CONVEYOR__BATCH__MAX_WAIT", "batch.max_wait"),
        (
            "CONVEYOR__BATCH__RETRY_INITIAL_INTERVAL",
            "batch.retry_initial_interval",
        ),
        (
            "CONVEYOR__SHUTDOWN__DRAIN_TIMEOUT",
            "shutdown.drain_timeout",
        ),
    ] {
        let text = rejection(var, "0s");
        assert!(
            text.contains(&format!("{key}: must be in 1ms..=")),
            "{var}: {text}"
        );
        assert!(text.contains("got 0s"), "{var}: {text}");
        // Far beyond any bound: a deadline computed from it would overflow.
        let text = rejection(var, "100000years");
        assert!(
            text.contains(&format!("{key}: must be in 1ms..=")),
            "{var}: {text}"
        );
    }
    let text = rejection("CONVEYOR__PAYMENT__RETRY__MAX_ELAPSED", "0s");
    assert!(
        text.contains("payment.retry.max_elapsed: must be in 1ms..=1day, got 0s"),
        "{text}"
    );
    let ok = Config::load_with_env(
        None,
        Some(env(&[
            ("CONVEYOR__PAYMENT__RETRY__MAX_ELAPSED", "1ms"),
            ("CONVEYOR__DATABASE__ACQUIRE_TIMEOUT", "1h"),
            ("CONVEYOR__PAYMENT__BREAKER__NOT_READY_AFTER", "24h"),
        ])),
    );
    assert!(ok.is_ok(), "{:?}", ok.err());
}

#[test]
fn log_level_must_be_a_filter() {
    for bad in ["garbage", "", "conveyor=loud", "info,lapin=nope", "inf"] {
        let text = rejection("CONVEYOR__LOG__LEVEL", bad);
        assert!(
            text.contains(
                "log.level: must be a tracing filter, comma-separated LEVEL or \
                 TARGET=LEVEL directives (LEVEL: off, error, warn, info, debug, trace)"
            ),
            "{bad:?}: {text}"
        );
    }
    for good in [
        "info",
        "WARN",
        "warn,conveyor=debug,lapin=off",
        "conveyor::source=trace",
        "off",
    ] {
        let got = Config::load_with_env(None, Some(env(&[("CONVEYOR__LOG__LEVEL", good)])));
        assert!(got.is_ok(), "{good:?}: {:?}", got.err());
    }
}

#[test]
fn prefetch_follow_keys_are_checked_with_their_names() {
    let ok = Config::load_with_env(
        None,
        Some(env(&[
            ("CONVEYOR__SOURCE__PREFETCH_FOLLOW__ENABLED", "true"),
            ("CONVEYOR__SOURCE__PREFETCH_FOLLOW__FLOOR", "8"),
        ])),
    )
    .expect("a floor under source.prefetch");
    assert!(ok.source.prefetch_follow.enabled);
    assert_eq!(ok.source.prefetch_follow.floor, 8);

    let err = Config::load_with_env(
        None,
        Some(env(&[
            ("CONVEYOR__SOURCE__PREFETCH", "100"),
            ("CONVEYOR__SOURCE__PREFETCH_FOLLOW__ENABLED", "true"),
            ("CONVEYOR__SOURCE__PREFETCH_FOLLOW__FLOOR", "101"),
        ])),
    )
    .expect_err("a floor above the ceiling")
    .to_string();
    assert!(
        err.contains("source.prefetch_follow.floor: must be in 1..=source.prefetch (100), got 101"),
        "{err}"
    );

    // Quorum queues follow by swapping the consumer (`rabbitmq::swap`);
    // the floor is checked for them as for classic ones.
    let mut c = Config::default();
    c.source.prefetch_follow.enabled = true;
    c.rabbitmq.queue_type = QueueType::Quorum;
    c.validate().expect("following on a quorum queue");
    c.source.prefetch_follow.floor = c.source.prefetch + 1;
    let err = c
        .validate()
        .expect_err("a floor above the ceiling")
        .to_string();
    assert!(err.contains("source.prefetch_follow.floor"), "{err}");
}
