//! Child processes (the simulator and the daemon under test) and what the
//! kernel says about them: CPU time, resident memory, exit.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use nix::sys::signal::{kill, Signal};
use nix::unistd::{sysconf, Pid, SysconfVar};

pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

pub struct Proc {
    child: Child,
    pid: i32,
    log: PathBuf,
    reaped: bool,
    hwm_kib: u64,
}

pub struct Exit {
    pub code: Option<i32>,
    /// Peak resident set size over the process's life (its `VmHWM`, last
    /// read just before it exited).
    pub max_rss_kib: u64,
}

impl Proc {
    pub fn spawn(
        bin: &Path,
        args: &[&str],
        env: &[(String, String)],
        log: PathBuf,
    ) -> anyhow::Result<Self> {
        let file =
            std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let child = Command::new(bin)
            .args(args)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let pid = i32::try_from(child.id()).context("pid")?;
        // Reaped in poll_exit, which also samples its peak RSS first.
        Ok(Self {
            child,
            pid,
            log,
            reaped: false,
            hwm_kib: 0,
        })
    }

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// Polls `url` until it answers 2xx, or fails with the log's tail.
    pub async fn wait_http_ok(&mut self, url: &str, within: Duration) -> anyhow::Result<()> {
        let started = Instant::now();
        let http = reqwest::Client::new();
        loop {
            if let Ok(r) = http.get(url).send().await {
                if r.status().is_success() {
                    return Ok(());
                }
            }
            if let Some(exit) = self.poll_exit()? {
                anyhow::bail!(
                    "process exited ({:?}) before {url} answered; log:\n{}",
                    exit.code,
                    self.log_tail()
                );
            }
            if started.elapsed() > within {
                anyhow::bail!(
                    "{url} not ready after {within:?}; log:\n{}",
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// User + system CPU seconds so far.
    pub fn cpu_secs(&self) -> anyhow::Result<f64> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid))?;
        // Fields after the parenthesised command name; utime and stime are
        // the 14th and 15th of the whole line.
        let rest = stat
            .rsplit_once(')')
            .map(|(_, r)| r)
            .context("/proc/PID/stat")?;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks: u64 = fields
            .get(11)
            .zip(fields.get(12))
            .and_then(|(u, s)| Some(u.parse::<u64>().ok()? + s.parse::<u64>().ok()?))
            .context("utime/stime in /proc/PID/stat")?;
        let hz = sysconf(SysconfVar::CLK_TCK)
            .context("sysconf(CLK_TCK)")?
            .unwrap_or(100);
        Ok(ticks as f64 / hz.max(1) as f64)
    }

    /// Sends `sig` to the child unless it was reaped (its pid may be reused).
    pub fn signal(&self, sig: Signal) {
        if !self.reaped {
            // It may have exited unreaped a moment ago: nothing to do then.
            let _ = kill(Pid::from_raw(self.pid), sig);
        }
    }

    /// Reads the peak resident set size so far from `/proc/PID/status`.
    ///
    /// Not `ru_maxrss` from `wait4`: Linux carries that over from before the
    /// `exec`, when the forked child still counted the parent's pages.
    fn sample_hwm(&mut self) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid));
        let hwm = status.ok().and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        });
        if let Some(kib) = hwm {
            self.hwm_kib = self.hwm_kib.max(kib);
        }
    }

    /// The exit report if the process has exited, without waiting.
    pub fn poll_exit(&mut self) -> anyhow::Result<Option<Exit>> {
        if self.reaped {
            anyhow::bail!("already reaped");
        }
        self.sample_hwm();
        let Some(status) = self.child.try_wait()? else {
            return Ok(None);
        };
        self.reaped = true;
        Ok(Some(Exit {
            // None when a signal ended it.
            code: status.code(),
            max_rss_kib: self.hwm_kib,
        }))
    }

    /// Waits for exit, polling every millisecond.
    pub async fn wait(&mut self, within: Duration) -> anyhow::Result<Exit> {
        let started = Instant::now();
        loop {
            if let Some(exit) = self.poll_exit()? {
                return Ok(exit);
            }
            if started.elapsed() > within {
                anyhow::bail!(
                    "process {} still running after {within:?}; log:\n{}",
                    self.pid,
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// SIGTERM, then the seconds until exit and the exit report.
    pub async fn terminate(&mut self, within: Duration) -> anyhow::Result<(f64, Exit)> {
        let started = Instant::now();
        self.signal(Signal::SIGTERM);
        let exit = self.wait(within).await?;
        Ok((started.elapsed().as_secs_f64(), exit))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if !self.reaped {
            // SIGKILL, then reap it.
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
