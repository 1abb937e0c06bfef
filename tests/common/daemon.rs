//! The daemon under test: [`Daemon`], the real binary as a child process
//! (logs in a file, signals, exit code, RSS; a `tokio::process` child, so
//! waiting for it never blocks an async worker), and [`InProcess`], the
//! library entry point in this test's runtime, stopped through its
//! shutdown future.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use conveyor::config::Config;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::process::{Child, Command};

use super::env::Env;

/// A port free right now on loopback.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

pub fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_conveyor"))
}

/// The daemon as a child process, with its logs in a file.
pub struct Daemon {
    pub child: Child,
    /// Kept from the spawn: `Child::id` forgets it once the child is reaped.
    pid: i32,
    pub http: SocketAddr,
    pub log: PathBuf,
}

impl Daemon {
    pub async fn start(env: &Env, extra: &[(&str, &str)]) -> Self {
        Self::start_with(env, extra, false).await
    }

    /// As `start`; with `as_watchdog_pid`, through `sh -c 'exec …'` so that
    /// `WATCHDOG_PID` can name the daemon's own pid, as systemd does.
    pub async fn start_with(env: &Env, extra: &[(&str, &str)], as_watchdog_pid: bool) -> Self {
        let port = free_port();
        let log = std::env::temp_dir().join(format!("{}-{port}.log", env.name));
        let file = std::fs::File::create(&log).expect("log file");
        let mut cmd = if as_watchdog_pid {
            let mut c = Command::new("sh");
            c.args(["-c", "WATCHDOG_PID=$$ exec \"$0\" run"])
                .arg(binary());
            c
        } else {
            let mut c = Command::new(binary());
            c.arg("run");
            c
        };
        cmd.envs(env.env_vars(port))
            .envs(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())))
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file)
            .kill_on_drop(true);
        let child = cmd.spawn().expect("spawn conveyor");
        let pid = child
            .id()
            .and_then(|id| i32::try_from(id).ok())
            .expect("a running child has a pid");
        let http: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
        let d = Self {
            child,
            pid,
            http,
            log,
        };
        let started = Instant::now();
        loop {
            if let Ok(r) = super::http()
                .get(format!("http://{http}/readyz"))
                .send()
                .await
            {
                if r.status().is_success() {
                    break;
                }
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "daemon not ready after 30 s; log:\n{}",
                d.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        d
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    pub fn signal(&self, sig: Signal) {
        if let Err(e) = kill(Pid::from_raw(self.pid()), sig) {
            panic!("kill({}, {sig}): {e}", self.pid());
        }
    }

    /// Waits for exit; returns the exit code and how long it took.
    pub async fn wait(&mut self, limit: Duration) -> (Option<i32>, Duration) {
        let started = Instant::now();
        match tokio::time::timeout(limit, self.child.wait()).await {
            Ok(status) => (status.expect("wait").code(), started.elapsed()),
            Err(_) => {
                self.child.start_kill().ok();
                panic!(
                    "daemon did not exit within {limit:?}; log:\n{}",
                    self.log_text()
                );
            }
        }
    }

    /// Resident set size now and at its peak, in KiB.
    pub fn rss_kib(&self) -> (u64, u64) {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        (field("VmRSS:"), field("VmHWM:"))
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// The daemon running in-process (`conveyor::run_with`), stopped through
/// its shutdown future as SIGTERM would.
pub struct InProcess {
    pub addr: SocketAddr,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<anyhow::Result<conveyor::Report>>,
}

/// How long an in-process daemon may take to stop once told to.
const STOP_LIMIT: Duration = Duration::from_secs(120);

impl InProcess {
    /// Starts it and waits until it is ready.
    pub async fn start(config: Config) -> Self {
        // `RUST_LOG=conveyor=info cargo nextest run --no-capture …` shows
        // what in-process daemons log; silent otherwise.
        if std::env::var_os("RUST_LOG").is_some() {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
                .with_test_writer()
                .try_init();
        }
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (addr_tx, addr_rx) = tokio::sync::oneshot::channel();
        let hooks = conveyor::Hooks {
            on_ready: Some(Box::new(move |addr| {
                let _ = addr_tx.send(addr);
            })),
            metrics: None,
        };
        let task = tokio::spawn(conveyor::run_with(
            config,
            async move {
                let _ = stop_rx.await;
            },
            hooks,
        ));
        let addr = addr_rx.await.expect("daemon became ready");
        Self { addr, stop, task }
    }

    /// Drains it and returns its report; a run that has not returned
    /// within [`STOP_LIMIT`] (well past any drain deadline the tests set)
    /// fails the test as a hung shutdown.
    pub async fn stop(self) -> conveyor::Report {
        self.stop.send(()).expect("daemon still running");
        tokio::time::timeout(STOP_LIMIT, self.task)
            .await
            .unwrap_or_else(|_| panic!("the in-process daemon did not stop within {STOP_LIMIT:?}"))
            .expect("join")
            .expect("run succeeded")
    }
}
