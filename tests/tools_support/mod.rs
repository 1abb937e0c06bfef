//! Helpers of the ingest, export and dlq tests: `conveyor ingest`
//! in-process or as a child process, a TCP proxy in front of RabbitMQ that
//! can be cut or frozen (an outage of this test's broker path without
//! touching the RabbitMQ other tests share), batches of orders as bodies.

#![allow(dead_code)]

pub mod kafka;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use conveyor::config::Config;
use conveyor::tools::produce::OrderGen;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

/// `conveyor ingest` in-process.
pub struct Ingest {
    pub addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    pub task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Ingest {
    /// Starts it; with `wait_ready`, until `/readyz` says the broker is up.
    pub async fn start(config: Config, wait_ready: bool) -> Self {
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (addr_tx, addr_rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(conveyor::tools::ingest::run(
            config,
            async move {
                let _ = stop_rx.await;
            },
            Some(Box::new(move |a| {
                let _ = addr_tx.send(a);
            })),
        ));
        let addr = addr_rx.await.expect("ingest listening");
        let me = Self {
            addr,
            stop: Some(stop),
            task,
        };
        if wait_ready {
            me.wait_ready(true).await;
        }
        me
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub async fn wait_ready(&self, want: bool) {
        wait_ready(self.addr, want).await;
    }

    pub async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        self.task.await.expect("join ingest")
    }
}

pub async fn wait_ready(addr: SocketAddr, want: bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ok = match reqwest::get(format!("http://{addr}/readyz")).await {
            Ok(r) => r.status().is_success(),
            Err(_) => false,
        };
        if ok == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "ingest at {addr} not {} after 30 s",
            if want { "ready" } else { "unready" }
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The base configuration of an ingest on this test's queue and database.
pub fn ingest_config(base: Config) -> Config {
    let mut c = base;
    c.ingest.listen = "127.0.0.1:0".parse().expect("addr");
    c.ingest.publish_timeout = Duration::from_secs(3);
    c
}

/// Orders `range` of `gen` as NDJSON.
pub fn ndjson(gen: &OrderGen, range: std::ops::Range<u64>) -> Vec<u8> {
    let mut out = Vec::new();
    for i in range {
        out.extend_from_slice(&gen.message(i).1);
        out.push(b'\n');
    }
    out
}

/// Orders `range` of `gen` as a JSON array.
pub fn json_array(gen: &OrderGen, range: std::ops::Range<u64>) -> Vec<u8> {
    let mut out = b"[".to_vec();
    for (n, i) in range.enumerate() {
        if n > 0 {
            out.push(b',');
        }
        out.extend_from_slice(&gen.message(i).1);
    }
    out.push(b']');
    out
}

pub async fn post(url: &str, body: Vec<u8>, content_type: &str) -> reqwest::Response {
    reqwest::Client::new()
        .post(url)
        .header("content-type", content_type)
        .body(body)
        .send()
        .await
        .expect("POST")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Forward,
    Frozen,
}

/// A TCP proxy to `upstream` on a fixed loopback port.
pub struct Proxy {
    pub port: u16,
    upstream: SocketAddr,
    mode: Arc<watch::Sender<Mode>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Proxy {
    pub async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let port = listener.local_addr().expect("addr").port();
        let (mode, _) = watch::channel(Mode::Forward);
        let mut p = Self {
            port,
            upstream,
            mode: Arc::new(mode),
            task: None,
        };
        p.serve(listener);
        p
    }

    pub fn amqp_url(&self) -> String {
        format!("amqp://127.0.0.1:{}/%2f", self.port)
    }

    fn serve(&mut self, listener: TcpListener) {
        let upstream = self.upstream;
        let mode = self.mode.clone();
        self.task = Some(tokio::spawn(async move {
            let mut conns = JoinSet::new();
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                let mode = mode.clone();
                conns.spawn(async move {
                    let Ok(server) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    let a = relay(cr, sw, mode.subscribe());
                    let b = relay(sr, cw, mode.subscribe());
                    tokio::select! {
                        _ = a => {}
                        _ = b => {}
                    }
                });
            }
        }));
    }

    /// Every connection through the proxy is cut and no new one is taken:
    /// to the client, the broker is gone.
    pub fn down(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }

    /// The broker is back on the same port.
    pub async fn up(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        let listener = loop {
            match TcpListener::bind(("127.0.0.1", self.port)).await {
                Ok(l) => break l,
                Err(e) => {
                    assert!(Instant::now() < deadline, "rebind proxy port: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        };
        self.serve(listener);
    }

    /// Connections stay open but no byte goes through: a broker that hangs.
    pub fn freeze(&self, frozen: bool) {
        let _ = self
            .mode
            .send(if frozen { Mode::Frozen } else { Mode::Forward });
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.down();
    }
}

async fn relay(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut mode: watch::Receiver<Mode>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        while *mode.borrow_and_update() == Mode::Frozen {
            if mode.changed().await.is_err() {
                return;
            }
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// `conveyor ingest` (or another subcommand) as a child process.
pub struct ChildProc {
    pub child: Child,
    pub log: PathBuf,
}

pub fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_conveyor"))
}

impl ChildProc {
    pub fn spawn(args: &[&str], env: &[(String, String)], tag: &str) -> Self {
        let log = std::env::temp_dir().join(format!(
            "conveyor-{tag}-{}.log",
            uuid::Uuid::new_v4().simple()
        ));
        let file = std::fs::File::create(&log).expect("log file");
        let child = Command::new(binary())
            .args(args)
            .envs(env.iter().cloned())
            .env_remove("RUST_LOG")
            .env("CONVEYOR__LOG__LEVEL", "warn,conveyor=info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("spawn conveyor");
        Self { child, log }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).expect("pid"));
        nix::sys::signal::kill(pid, sig).expect("kill");
    }

    pub async fn wait(&mut self, limit: Duration) -> Option<i32> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(s) = self.child.try_wait().expect("try_wait") {
                return s.code();
            }
            if Instant::now() > deadline {
                self.child.kill().ok();
                panic!(
                    "child did not exit within {limit:?}; log:\n{}",
                    self.log_text()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for ChildProc {
    fn drop(&mut self) {
        self.child.kill().ok();
        self.child.wait().ok();
    }
}

/// A free loopback port.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// Publishes `(headers, body)` messages straight into a queue, with
/// confirms, as the daemon's dead-letter publisher would.
/// A message to put: its text headers and its body.
pub type Letter<'a> = (Vec<(&'a str, String)>, Vec<u8>);

pub async fn rabbit_put(queue: &str, messages: Vec<Letter<'_>>) {
    use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
    let cfg = conveyor::config::RabbitConfig {
        queue: queue.to_string(),
        declare: false,
        ..conveyor::config::RabbitConfig::default()
    };
    let conn = conveyor::tools::produce::connect_rabbit(&cfg)
        .await
        .expect("connect");
    let ch = conveyor::tools::produce::ConfirmChannel::open(&conn)
        .await
        .expect("channel");
    let mut pending = Vec::new();
    for (headers, body) in messages {
        let mut t = FieldTable::default();
        for (k, v) in headers {
            t.insert(
                ShortString::from(k),
                AMQPValue::LongString(LongString::from(v.into_bytes())),
            );
        }
        let props = lapin::BasicProperties::default()
            .with_delivery_mode(2)
            .with_headers(t);
        pending.push(ch.publish("", queue, &body, props).await.expect("publish"));
        if pending.len() >= 500 {
            futures::future::try_join_all(std::mem::take(&mut pending))
                .await
                .expect("confirms");
        }
    }
    futures::future::try_join_all(pending)
        .await
        .expect("confirms");
    ch.close().await;
    conn.close(200, "done".into()).await.ok();
}

/// Takes every message from a queue: (headers as text, body).
pub async fn rabbit_take_all(
    queue: &str,
) -> Vec<(std::collections::HashMap<String, String>, Vec<u8>)> {
    use lapin::options::{BasicAckOptions, BasicGetOptions};
    use lapin::types::AMQPValue;
    let conn = lapin::Connection::connect(common_amqp(), lapin::ConnectionProperties::default())
        .await
        .expect("connect");
    let ch = conn.create_channel().await.expect("channel");
    let mut out = Vec::new();
    while let Some(msg) = ch
        .basic_get(queue.into(), BasicGetOptions::default())
        .await
        .expect("basic.get")
    {
        let mut headers = std::collections::HashMap::new();
        if let Some(h) = msg.delivery.properties.headers() {
            for (k, v) in h.inner() {
                if let AMQPValue::LongString(s) = v {
                    headers.insert(k.to_string(), s.to_string());
                }
            }
        }
        out.push((headers, msg.delivery.data.clone()));
        msg.delivery
            .acker
            .ack(BasicAckOptions::default())
            .await
            .expect("ack");
    }
    conn.close(200, "done".into()).await.ok();
    out
}

fn common_amqp() -> &'static str {
    "amqp://127.0.0.1:5672/%2f"
}

/// The `order_id` of an order body, if it has one.
pub fn order_id(body: &[u8]) -> Option<String> {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()?
        .get("order_id")?
        .as_str()
        .map(str::to_string)
}

/// Headers of a dead letter as the daemon writes them.
pub fn dead_letter_headers(
    reason: &str,
    stage: &str,
    order_id: &str,
    failed_at: &str,
) -> Vec<(&'static str, String)> {
    vec![
        ("x-conveyor-reason", reason.to_string()),
        ("x-conveyor-detail", format!("{reason} in the test")),
        ("x-conveyor-stage", stage.to_string()),
        ("x-conveyor-failed-at", failed_at.to_string()),
        ("x-conveyor-order-id", order_id.to_string()),
    ]
}

/// How long a one-shot subcommand may run before the test calls it hung.
const CLI_LIMIT: Duration = Duration::from_secs(180);

/// Runs a `conveyor` subcommand to its end: (exit code, stdout, stderr).
/// One that is still running after [`CLI_LIMIT`] is killed and the test
/// fails naming it, with what it printed.
pub fn run_cli(args: &[&str], env: &[(String, String)]) -> (Option<i32>, String, String) {
    let child = Command::new(binary())
        .args(args)
        .envs(env.iter().cloned())
        .env_remove("RUST_LOG")
        .env("CONVEYOR__LOG__LEVEL", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run conveyor");
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).expect("a pid"));
    let (done, finished) = std::sync::mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        let hung = finished.recv_timeout(CLI_LIMIT).is_err();
        if hung {
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        }
        hung
    });
    let out = child.wait_with_output().expect("wait for conveyor");
    let _ = done.send(());
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !watchdog.join().expect("the watchdog"),
        "conveyor {args:?} still running after {CLI_LIMIT:?}: killed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    (out.status.code(), stdout, stderr)
}
