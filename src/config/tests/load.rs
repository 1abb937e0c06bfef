//! Loading: the file, the environment overrides, and what they parse into.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use super::env;
use crate::config::*;

#[test]
fn defaults_are_valid() {
    Config::default().validate().expect("defaults validate");
}

#[test]
fn shipped_example_matches_the_defaults() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/conveyor.toml");
    let cfg = Config::load_with_env(Some(&path), Some(HashMap::new())).expect("loads");
    assert_eq!(
        cfg.to_redacted_toml(),
        Config::default().to_redacted_toml(),
        "config/conveyor.toml must list the defaults"
    );
}

#[test]
fn environment_overrides_nested_keys() {
    let cfg = Config::load_with_env(
        None,
        Some(env(&[
            ("CONVEYOR__BATCH__MAX_SIZE", "1000"),
            ("CONVEYOR__SHUTDOWN__DRAIN_TIMEOUT", "5s"),
            ("CONVEYOR__PAYMENT__RETRY__MAX_ELAPSED", "1m"),
            ("CONVEYOR__DATABASE__PASSWORD", "12345"),
        ])),
    )
    .expect("loads");
    assert_eq!(cfg.batch.max_size, 1000);
    assert_eq!(cfg.shutdown.drain_timeout, Duration::from_secs(5));
    assert_eq!(cfg.payment.retry.max_elapsed, Duration::from_secs(60));
    assert_eq!(
        cfg.database.password.as_ref().map(Secret::expose),
        Some("12345")
    );
}

#[test]
fn breaker_keys_from_the_environment() {
    let cfg = Config::load_with_env(
        None,
        Some(env(&[
            ("CONVEYOR__PAYMENT__BREAKER__FAILURE_RATE", "0.25"),
            ("CONVEYOR__PAYMENT__BREAKER__OPEN_FOR", "1s"),
            ("CONVEYOR__RULE_ENGINE__BREAKER__ENABLED", "false"),
            ("CONVEYOR__RULE_ENGINE__BREAKER__NOT_READY_AFTER", "2m"),
        ])),
    )
    .expect("loads");
    assert_eq!(cfg.payment.breaker.failure_rate, 0.25);
    assert_eq!(cfg.payment.breaker.open_for, Duration::from_secs(1));
    assert!(cfg.payment.breaker.enabled);
    assert!(!cfg.rule_engine.breaker.enabled);
    assert_eq!(
        cfg.rule_engine.breaker.not_ready_after,
        Duration::from_secs(120)
    );
}

#[test]
fn database_url_scheme_picks_the_store() {
    for url in [
        "postgres://postgres@127.0.0.1:5432/conveyor",
        "postgresql://db/conveyor",
        "sqlite://conveyor.db",
        "sqlite:data/x.db?mode=rwc",
    ] {
        let cfg = Config::load_with_env(None, Some(env(&[("CONVEYOR__DATABASE__URL", url)])))
            .unwrap_or_else(|e| panic!("{url}: {e}"));
        assert_eq!(cfg.database.url, url);
    }
    let err = Config::load_with_env(
        None,
        Some(env(&[("CONVEYOR__DATABASE__URL", "mysql://db/conveyor")])),
    )
    .expect_err("invalid");
    assert!(
        err.to_string().contains(
            "database.url: must be postgres://[USER@]HOST[:PORT]/DATABASE (or postgresql://; \
             port in 1..=65535), sqlite:FILE or sqlite://FILE, \
             got \"mysql://db/conveyor\": scheme \"mysql\" is not allowed"
        ),
        "{err}"
    );
}

#[test]
fn type_errors_name_the_key() {
    let err = Config::load_with_env(None, Some(env(&[("CONVEYOR__BATCH__MAX_WAIT", "soon")])))
        .expect_err("invalid");
    assert!(err.to_string().contains("batch.max_wait"), "{err}");
}

#[test]
fn unknown_keys_are_rejected() {
    let err = Config::load_with_env(None, Some(env(&[("CONVEYOR__BATCH__MAX_SIZ", "3")])))
        .expect_err("invalid");
    assert!(err.to_string().contains("max_siz"), "{err}");
}

#[test]
fn kafka_keys_from_the_environment() {
    let cfg = Config::load_with_env(
        None,
        Some(env(&[
            ("CONVEYOR__SOURCE__KIND", "kafka"),
            ("CONVEYOR__KAFKA__TOPICS", "a,b"),
            ("CONVEYOR__KAFKA__GROUP_ID", "g"),
        ])),
    )
    .expect("loads");
    assert_eq!(cfg.source.kind, SourceKind::Kafka);
    assert_eq!(cfg.kafka.topics, vec!["a".to_string(), "b".to_string()]);
    assert_eq!(cfg.kafka.dead_letter_topic("a"), "a.dlq");
    let err = Config::load_with_env(
        None,
        Some(env(&[
            ("CONVEYOR__SOURCE__KIND", "kafka"),
            ("CONVEYOR__KAFKA__GROUP_ID", ""),
        ])),
    )
    .expect_err("empty group");
    assert!(err.to_string().contains("kafka.group_id"), "{err}");
}
