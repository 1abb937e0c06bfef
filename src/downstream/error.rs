//! How one HTTP attempt to a downstream failed, with the underlying error
//! kept as its source. Transport failures are classified by reqwest's own
//! predicates rather than by their message.

use std::sync::Arc;
use std::time::Duration;

/// How one HTTP attempt failed.
///
/// The reqwest errors sit behind an `Arc` because a `CallError` is cloned
/// (the retry loop keeps the last one) and `reqwest::Error` is not `Clone`.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CallError {
    /// No answer within the attempt's timeout (connecting included).
    #[error("timeout: {0}")]
    Timeout(#[source] Arc<reqwest::Error>),
    /// The connection could not be made (refused, unreachable, TLS).
    #[error("connect: {0}")]
    Connect(#[source] Arc<reqwest::Error>),
    /// Any other transport failure: connection reset, malformed response,
    /// a success body that is not the expected JSON.
    #[error("transport: {0}")]
    Transport(#[source] Arc<reqwest::Error>),
    /// The request body could not be encoded; nothing was sent.
    #[error("request body: {0}")]
    Encode(#[source] Arc<serde_json::Error>),
    /// A non-success status.
    #[error("HTTP {status}: {body}")]
    Status {
        status: u16,
        /// First bytes of the response body.
        body: String,
        retry_after: Option<Duration>,
    },
}

impl From<reqwest::Error> for CallError {
    /// Classifies a reqwest error: a timeout first (a connect that timed out
    /// counts as a timeout), then a failed connect, else a transport error.
    fn from(e: reqwest::Error) -> Self {
        if e.is_timeout() {
            CallError::Timeout(Arc::new(e))
        } else if e.is_connect() {
            CallError::Connect(Arc::new(e))
        } else {
            CallError::Transport(Arc::new(e))
        }
    }
}

impl CallError {
    /// Timeouts, connect and other transport errors, 5xx and 429 are worth
    /// retrying; any other status is the downstream's final word, and a body
    /// that cannot be encoded will not encode on a second try either.
    pub fn is_transient(&self) -> bool {
        match self {
            CallError::Timeout(_) | CallError::Connect(_) | CallError::Transport(_) => true,
            CallError::Encode(_) => false,
            CallError::Status { status, .. } => *status == 429 || *status >= 500,
        }
    }

    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            CallError::Status { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// Label for `conveyor_downstream_requests_total{result}`.
    pub fn result_label(&self) -> &'static str {
        match self {
            CallError::Timeout(_) => "timeout",
            CallError::Connect(_) | CallError::Transport(_) => "transport_error",
            CallError::Encode(_) => "encode_error",
            CallError::Status { status: 429, .. } => "throttled",
            CallError::Status { status, .. } if *status >= 500 => "server_error",
            CallError::Status { .. } => "client_error",
        }
    }
}

/// Real transport errors for unit tests, each made once by a request over a
/// real socket on its own thread and runtime (so that tests on paused time
/// can use them).
#[cfg(test)]
pub(crate) mod testing {
    use std::sync::OnceLock;
    use std::time::Duration;

    use super::CallError;

    fn on_own_runtime(f: impl FnOnce() -> CallError + Send + 'static) -> CallError {
        std::thread::spawn(f).join().expect("error-making thread")
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
    }

    /// A request to a local port nobody listens on: connection refused.
    pub(crate) fn connect_error() -> CallError {
        static ERR: OnceLock<CallError> = OnceLock::new();
        ERR.get_or_init(|| {
            on_own_runtime(|| {
                let port = std::net::TcpListener::bind("127.0.0.1:0")
                    .and_then(|l| l.local_addr())
                    .expect("free port")
                    .port();
                let err = runtime()
                    .block_on(async { reqwest::get(format!("http://127.0.0.1:{port}/")).await })
                    .expect_err("nobody listens on a port just freed");
                let err = CallError::from(err);
                assert!(matches!(err, CallError::Connect(_)), "{err:?}");
                err
            })
        })
        .clone()
    }

    /// A request with a 1 ms timeout to a listener that never answers.
    pub(crate) fn timeout_error() -> CallError {
        static ERR: OnceLock<CallError> = OnceLock::new();
        ERR.get_or_init(|| {
            on_own_runtime(|| {
                // Bound and listening, never accepted: the kernel completes
                // the handshake, but no answer ever comes.
                let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("listener");
                let port = listener.local_addr().expect("local addr").port();
                let client = reqwest::Client::builder()
                    .timeout(Duration::from_millis(1))
                    .build()
                    .expect("client");
                let err = runtime()
                    .block_on(async {
                        client.get(format!("http://127.0.0.1:{port}/")).send().await
                    })
                    .expect_err("the listener never answers");
                drop(listener);
                let err = CallError::from(err);
                assert!(matches!(err, CallError::Timeout(_)), "{err:?}");
                err
            })
        })
        .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{connect_error, timeout_error};
    use super::*;

    #[test]
    fn transport_errors_are_classified_by_reqwest_and_keep_their_source() {
        let timeout = timeout_error();
        assert_eq!(timeout.result_label(), "timeout");
        assert!(timeout.is_transient());
        assert_eq!(timeout.retry_after(), None);
        let connect = connect_error();
        assert_eq!(connect.result_label(), "transport_error");
        assert!(connect.is_transient());
        for e in [&timeout, &connect] {
            let source = std::error::Error::source(e).expect("source kept");
            assert!(source.is::<Arc<reqwest::Error>>(), "{source:?}");
        }
    }

    #[test]
    fn a_body_that_cannot_be_encoded_is_permanent() {
        // JSON object keys must be strings.
        let map = std::collections::BTreeMap::from([(vec![1u8], 1)]);
        let bad = serde_json::to_vec(&map).expect_err("a non-string map key");
        let e = CallError::Encode(Arc::new(bad));
        assert!(!e.is_transient());
        assert_eq!(e.result_label(), "encode_error");
    }
}
