//! Secrets kept out of everything shown: the [`Secret`] type, redaction of
//! URLs and `kafka.properties`, the [`Scrubber`] behind the log writer, and
//! secrets read from files.

use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize, Serializer};

use super::{Config, KeyError};

/// A secret value: never printed, whether through `Debug` or serialization.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"[redacted]\"")
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("[redacted]")
    }
}

pub(super) fn serialize_redacted_url<S: Serializer>(url: &str, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&redact_url(url))
}

pub(super) fn serialize_redacted_opt_url<S: Serializer>(
    url: &Option<String>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match url {
        Some(url) => s.serialize_some(&redact_url(url)),
        None => s.serialize_none(),
    }
}

/// What stands in for a secret wherever the configuration is shown.
pub const REDACTED: &str = "[redacted]";

/// Whether a name — a `kafka.properties` key, a URL query parameter — names
/// a secret whose value must never be shown: a password, passphrase, secret,
/// token or credential, key material (`ssl.key.pem`, `…private.key.pem`), or
/// a `*.config` that can carry any of them (`sasl.oauthbearer.config`,
/// `sasl.jaas.config`). A path to a file (`*.location`, `*.file`) is not the
/// secret it holds and stays visible.
pub fn is_secret_name(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    let words: Vec<&str> = name
        .split(['.', '_', '-'])
        .filter(|w| !w.is_empty())
        .collect();
    let last = words.last().copied().unwrap_or_default();
    if matches!(last, "location" | "file" | "path" | "dir") {
        return false;
    }
    const PARTS: [&str; 7] = [
        "password",
        "passwd",
        "passphrase",
        "secret",
        "token",
        "credential",
        "apikey",
    ];
    PARTS.iter().any(|p| name.contains(p))
        || words
            .iter()
            .any(|w| matches!(*w, "key" | "pwd" | "pass" | "jaas" | "auth"))
        || last == "config"
}

/// The URL as it may be shown: the password of its userinfo
/// (`scheme://user:password@host`, basic auth in a downstream URL) and the
/// value of every query parameter that names a secret (`?password=`,
/// `?sslpassword=`) replaced by `[redacted]`. A value that does not parse as
/// a URL has everything before its last `@` and its whole query hidden, since
/// its parts cannot be told apart.
pub fn redact_url(raw: &str) -> String {
    use url::Position;

    let Ok(url) = url::Url::parse(raw) else {
        return redact_unparsed_url(raw);
    };
    let query = url.query().map(redact_query);
    if url.password().is_none() && query.as_deref() == url.query() {
        return raw.to_string();
    }
    let mut shown = match url.password() {
        Some(_) => format!(
            "{}{REDACTED}{}",
            &url[..Position::BeforePassword],
            &url[Position::AfterPassword..Position::AfterPath]
        ),
        None => url[..Position::AfterPath].to_string(),
    };
    if let Some(q) = query {
        shown.push('?');
        shown.push_str(&q);
    }
    shown.push_str(&url[Position::AfterQuery..]);
    shown
}

/// A query string with the values of its secret-naming parameters redacted;
/// everything else is kept byte for byte.
fn redact_query(query: &str) -> String {
    query
        .split('&')
        .map(|pair| {
            let raw_key = pair.split_once('=').map_or(pair, |(k, _)| k);
            let key = url::form_urlencoded::parse(raw_key.as_bytes())
                .next()
                .map(|(k, _)| k.into_owned())
                .unwrap_or_default();
            if is_secret_name(&key) {
                format!("{raw_key}={REDACTED}")
            } else {
                pair.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("&")
}

fn redact_unparsed_url(raw: &str) -> String {
    let (base, query) = match raw.split_once('?') {
        Some((base, _)) => (base, Some(REDACTED)),
        None => (raw, None),
    };
    let mut shown = match base.rfind('@') {
        Some(at) => {
            let start = base.find("://").map_or(0, |i| i + 3).min(at);
            format!("{}{REDACTED}{}", &base[..start], &base[at..])
        }
        None => base.to_string(),
    };
    if let Some(q) = query {
        shown.push('?');
        shown.push_str(q);
    }
    shown
}

/// Every secret a configuration holds, to hide them in text the daemon does
/// not compose itself — a library's error that quotes the value it refused —
/// before that text is printed: the last line of defence behind redaction.
#[derive(Clone, Default)]
pub struct Scrubber {
    /// Longest first, so that a secret containing another is hidden whole.
    secrets: Vec<Secret>,
}

impl fmt::Debug for Scrubber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Scrubber({} secrets)", self.secrets.len())
    }
}

impl Scrubber {
    /// `text` with every secret replaced by `[redacted]`.
    pub fn scrub(&self, text: &str) -> String {
        self.secrets.iter().fold(text.to_string(), |text, secret| {
            text.replace(secret.expose(), REDACTED)
        })
    }

    /// Wraps a log writer: every line is scrubbed on its way out, whichever
    /// library logged it (librdkafka, for one, quotes a property value it
    /// cannot parse; the PostgreSQL driver quotes an unknown URL parameter).
    pub fn writer<W: std::io::Write>(
        self,
        make: impl Fn() -> W,
    ) -> impl Fn() -> ScrubbingWriter<W> {
        let scrubber = std::sync::Arc::new(self);
        move || ScrubbingWriter {
            inner: make(),
            scrubber: scrubber.clone(),
        }
    }
}

/// A writer that scrubs what goes through it; see [`Scrubber::writer`].
/// Each write is scrubbed whole: `tracing`'s formatter writes one event in
/// one call, so a secret is never split across two.
pub struct ScrubbingWriter<W> {
    inner: W,
    scrubber: std::sync::Arc<Scrubber>,
}

impl<W: std::io::Write> std::io::Write for ScrubbingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match std::str::from_utf8(buf) {
            Ok(text) if !self.scrubber.secrets.is_empty() => {
                self.inner.write_all(self.scrubber.scrub(text).as_bytes())?
            }
            _ => self.inner.write_all(buf)?,
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

impl Config {
    pub fn scrubber(&self) -> Scrubber {
        let mut secrets: Vec<String> = Vec::new();
        for (key, inline, file) in [
            (
                "database.password",
                &self.database.password,
                &self.database.password_file,
            ),
            (
                "rabbitmq.password",
                &self.rabbitmq.password,
                &self.rabbitmq.password_file,
            ),
            (
                "kafka.security.password",
                &self.kafka.security.password,
                &self.kafka.security.password_file,
            ),
        ] {
            secrets.extend(inline.iter().map(|s| s.expose().to_string()));
            if let Ok(Some(s)) = resolve_secret(key, &None, file) {
                secrets.push(s.expose().to_string());
            }
        }
        for raw in [
            &self.database.url,
            &self.rabbitmq.url,
            &self.rule_engine.url,
            &self.payment.url,
        ] {
            secrets.extend(url_secrets(raw));
        }
        secrets.extend(
            self.telemetry
                .otlp
                .headers
                .values()
                .map(|v| v.expose().to_string()),
        );
        if let Some(endpoint) = &self.telemetry.otlp.endpoint {
            secrets.extend(url_secrets(endpoint));
        }
        for (key, value) in &self.kafka.properties {
            if !is_secret_name(key) {
                continue;
            }
            secrets.push(value.clone());
            if key.ends_with("config") {
                // `k=v k=v` lists: librdkafka quotes the rest of one from
                // where it stopped parsing ("…beginning at: k=v k=v"), or one
                // `k=v` alone.
                // Only parts that begin with a `k=v`: a bare word could be
                // any word of any line.
                let starts_pair = |part: &str| {
                    part.split_whitespace()
                        .next()
                        .is_some_and(|t| t.contains('=') && t.len() > 2)
                };
                for (at, _) in value.match_indices(char::is_whitespace) {
                    let tail = value[at..].trim_start();
                    if starts_pair(tail) {
                        secrets.push(tail.to_string());
                    }
                }
                secrets.extend(
                    value
                        .split_whitespace()
                        .filter(|t| starts_pair(t))
                        .map(str::to_string),
                );
            }
        }
        // As a JSON log line and a `?`-formatted field would show them.
        let escaped: Vec<String> = secrets
            .iter()
            .flat_map(|s| {
                let json = serde_json::to_string(s).unwrap_or_default();
                let debug = format!("{s:?}");
                [json, debug].map(|q| q.trim_matches('"').to_string())
            })
            .collect();
        secrets.extend(escaped);
        secrets.retain(|s| !s.is_empty());
        secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
        secrets.dedup();
        Scrubber {
            secrets: secrets.into_iter().map(Secret::new).collect(),
        }
    }
}

/// The secret parts of a URL, raw and percent-decoded (a library may quote
/// either).
fn url_secrets(raw: &str) -> Vec<String> {
    let Ok(url) = url::Url::parse(raw) else {
        return Vec::new();
    };
    let mut found = Vec::new();
    if let Some(pw) = url.password() {
        found.push(pw.to_string());
        if let Ok(decoded) = percent_decode(pw) {
            found.push(decoded);
        }
    }
    for (k, v) in url.query_pairs() {
        if is_secret_name(&k) {
            found.push(v.into_owned());
        }
    }
    if let Some(q) = url.query() {
        for pair in q.split('&') {
            if let Some((k, v)) = pair.split_once('=') {
                if is_secret_name(k) {
                    found.push(v.to_string());
                }
            }
        }
    }
    found
}

fn percent_decode(s: &str) -> Result<String, std::str::Utf8Error> {
    percent_encoding::percent_decode_str(s)
        .decode_utf8()
        .map(|d| d.into_owned())
}

pub(super) fn serialize_redacted_properties<S: Serializer>(
    props: &std::collections::BTreeMap<String, String>,
    s: S,
) -> Result<S::Ok, S::Error> {
    s.collect_map(redacted_properties(props))
}

/// `kafka.properties` as they may be shown: the value of every key that
/// names a secret ([`is_secret_name`]) replaced by `[redacted]`.
pub fn redacted_properties(
    props: &std::collections::BTreeMap<String, String>,
) -> impl Iterator<Item = (&str, &str)> + '_ {
    props.iter().map(|(k, v)| {
        let shown = if is_secret_name(k) { REDACTED } else { v };
        (k.as_str(), shown)
    })
}

/// Resolves a secret: the file wins over the inline value.
pub fn resolve_secret(
    key: &str,
    inline: &Option<Secret>,
    file: &Option<PathBuf>,
) -> Result<Option<Secret>, KeyError> {
    if let Some(path) = file {
        let text = std::fs::read_to_string(path).map_err(|e| KeyError {
            key: format!("{key}_file"),
            message: format!("cannot read {}: {e}", path.display()),
        })?;
        return Ok(Some(Secret::new(text.trim_end_matches(['\n', '\r']))));
    }
    Ok(inline.clone())
}
