//! The form of one configured value — a URL, a broker list, a log filter —
//! with errors that give the allowed form and the value, redacted.

use std::fmt;

use crate::config::secret::redact_url;

/// Parses a configured URL and checks what any of them needs: no whitespace
/// or control character (the parser would drop some silently), a scheme
/// from `schemes`, a host unless `host_optional`, and a port in 1..=65535
/// when one is given. The error says what is wrong, for a message that
/// also gives the allowed form and the value, redacted.
fn parse_url(raw: &str, schemes: &[&str], host_optional: bool) -> Result<url::Url, String> {
    if raw.is_empty() {
        return Err("it is empty".into());
    }
    if raw.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("it contains whitespace or a control character".into());
    }
    let url = url::Url::parse(raw).map_err(|e| e.to_string())?;
    if !schemes.contains(&url.scheme()) {
        return Err(format!("scheme {:?} is not allowed", url.scheme()));
    }
    if !host_optional && url.host_str().is_none_or(str::is_empty) {
        return Err("no host".into());
    }
    if url.port() == Some(0) {
        return Err("port 0".into());
    }
    Ok(url)
}

/// "must be FORM, got VALUE: WHY", the value redacted.
fn url_error(form: &str, raw: &str, why: impl fmt::Display) -> String {
    format!("must be {form}, got {:?}: {why}", redact_url(raw))
}

/// `rule_engine.url`, `payment.url`: a base URL the request path is
/// appended to.
pub(super) fn check_downstream_url(raw: &str) -> Result<(), String> {
    const FORM: &str = "an http:// or https:// base URL with a host, \
                        http[s]://HOST[:PORT][/PATH] (port in 1..=65535)";
    let url = parse_url(raw, &["http", "https"], false).map_err(|e| url_error(FORM, raw, e))?;
    if url.query().is_some() || url.fragment().is_some() {
        return Err(url_error(
            FORM,
            raw,
            "it has a ?query or #fragment, which the request path cannot follow",
        ));
    }
    Ok(())
}

pub(super) fn check_rabbitmq_url(raw: &str) -> Result<(), String> {
    const FORM: &str = "amqp://HOST[:PORT][/VHOST] or amqps://… (port in 1..=65535)";
    parse_url(raw, &["amqp", "amqps"], false).map_err(|e| url_error(FORM, raw, e))?;
    // What the client itself refuses (e.g. a query parameter it does not
    // know), in its words.
    raw.parse::<lapin::uri::AMQPUri>()
        .map(drop)
        .map_err(|e| url_error(FORM, raw, e))
}

pub(super) fn check_database_url(raw: &str) -> Result<(), String> {
    use std::str::FromStr as _;
    const FORM: &str = "postgres://[USER@]HOST[:PORT]/DATABASE (or postgresql://; \
                        port in 1..=65535), sqlite:FILE or sqlite://FILE";
    if let Some(rest) = raw.strip_prefix("sqlite:") {
        let file = rest.trim_start_matches("//");
        if file.split('?').next().is_none_or(str::is_empty) {
            return Err(url_error(FORM, raw, "no file"));
        }
        return sqlx::sqlite::SqliteConnectOptions::from_str(raw)
            .map(drop)
            .map_err(|e| url_error(FORM, raw, e));
    }
    let url =
        parse_url(raw, &["postgres", "postgresql"], true).map_err(|e| url_error(FORM, raw, e))?;
    // No host in the authority is libpq's way to say "the host given in the
    // query" (`postgres:///db?host=/run/postgresql`, a Unix socket).
    if url.host_str().is_none_or(str::is_empty) && !url.query_pairs().any(|(k, _)| k == "host") {
        return Err(url_error(
            FORM,
            raw,
            "no host (give one, or ?host=/socket/directory)",
        ));
    }
    // The PostgreSQL driver ignores a parameter it does not know with a
    // warning that quotes its value — a secret, for `?sslpassword=` — and
    // the setting silently does nothing: refused here instead.
    const PARAMS: [&str; 18] = [
        "sslmode",
        "ssl-mode",
        "sslrootcert",
        "ssl-root-cert",
        "ssl-ca",
        "sslcert",
        "ssl-cert",
        "sslkey",
        "ssl-key",
        "statement-cache-capacity",
        "host",
        "hostaddr",
        "port",
        "dbname",
        "user",
        "password",
        "application_name",
        "options",
    ];
    if let Some((key, _)) = url.query_pairs().find(|(k, _)| {
        !(PARAMS.contains(&k.as_ref()) || k.starts_with("options[") && k.ends_with(']'))
    }) {
        return Err(url_error(
            FORM,
            raw,
            format!(
                "unknown query parameter {key:?} (known: {}, options[NAME])",
                PARAMS.join(", ")
            ),
        ));
    }
    sqlx::postgres::PgConnectOptions::from_str(raw)
        .map(drop)
        .map_err(|e| url_error(FORM, raw, e))
}

/// `kafka.brokers`, librdkafka's `bootstrap.servers`.
pub(super) fn check_kafka_brokers(raw: &str) -> Result<(), String> {
    const FORM: &str = "comma-separated HOST[:PORT] entries (port in 1..=65535), \
                        each optionally PROTOCOL://HOST[:PORT]";
    let bad = |why: String| format!("must be {FORM}, got {raw:?}: {why}");
    if raw.trim().is_empty() {
        return Err(bad("it is empty".into()));
    }
    for entry in raw.split(',').map(str::trim) {
        if entry.is_empty() {
            return Err(bad("an empty entry".into()));
        }
        // The protocol prefix is librdkafka's, not a URL scheme (`SASL_SSL`
        // has an underscore): checked here, the rest parsed as a URL's host.
        let address = match entry.split_once("://") {
            Some((protocol, address)) => {
                const PROTOCOLS: [&str; 4] = ["plaintext", "ssl", "sasl_plaintext", "sasl_ssl"];
                if !PROTOCOLS.contains(&protocol.to_ascii_lowercase().as_str()) {
                    return Err(bad(format!(
                        "entry {entry:?}: protocol {protocol:?} is not one of \
                         PLAINTEXT, SSL, SASL_PLAINTEXT, SASL_SSL"
                    )));
                }
                address
            }
            None => entry,
        };
        let url = parse_url(&format!("kafka://{address}"), &["kafka"], false)
            .map_err(|e| bad(format!("entry {entry:?}: {e}")))?;
        if !url.username().is_empty()
            || url.password().is_some()
            || !matches!(url.path(), "" | "/")
            || url.query().is_some()
            || url.fragment().is_some()
        {
            return Err(bad(format!("entry {entry:?}: only HOST[:PORT] is allowed")));
        }
    }
    Ok(())
}

/// `log.level`: what `tracing`'s `EnvFilter` accepts, except that a bare
/// word must be a level: a bare target (`conveyor` for `conveyor=trace`) is
/// far more often a misspelt level, which would leave the daemon silent.
pub(super) fn check_log_filter(filter: &str) -> Result<(), String> {
    use tracing_subscriber::filter::{Directive, EnvFilter, LevelFilter};
    const FORM: &str = "a tracing filter, comma-separated LEVEL or TARGET=LEVEL directives \
                        (LEVEL: off, error, warn, info, debug, trace)";
    let bad = |why: String| format!("must be {FORM}, got {filter:?}: {why}");
    if filter.trim().is_empty() {
        return Err(bad("it is empty".into()));
    }
    for directive in filter.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        directive
            .parse::<Directive>()
            .map_err(|e| bad(format!("{directive:?}: {e}")))?;
        if !directive.contains(['=', '[']) && directive.parse::<LevelFilter>().is_err() {
            return Err(bad(format!(
                "{directive:?} is not a level (for a target write {directive}=LEVEL)"
            )));
        }
    }
    EnvFilter::builder()
        .parse(filter)
        .map(drop)
        .map_err(|e| bad(e.to_string()))
}
