//! systemd `Type=notify`: the real binary, with `NOTIFY_SOCKET` pointing at a
//! datagram socket this test owns, must say READY=1, then WATCHDOG=1 at the
//! requested interval, then STOPPING=1 when SIGTERM starts the drain.

mod common;

use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use common::{Daemon, Env};
use conveyor::tools::sim::Knobs;
use nix::sys::signal::Signal;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_watchdog_and_stopping_arrive_in_order() {
    let env = Env::new("notify", Knobs::default()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&path).expect("bind the notify socket");
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    let path_text = path.display().to_string();
    let mut daemon = Daemon::start_with(
        &env,
        &[
            ("NOTIFY_SOCKET", path_text.as_str()),
            // 400 ms: pings every 200 ms.
            ("WATCHDOG_USEC", "400000"),
        ],
        true,
    )
    .await;

    let mut seen: Vec<String> = Vec::new();
    let mut buf = [0u8; 512];
    let mut read_until = |seen: &mut Vec<String>, want: &str, limit: Duration| {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(n) = socket.recv(&mut buf) {
                let text = String::from_utf8_lossy(&buf[..n]).trim().to_string();
                let hit = text.lines().any(|l| l == want);
                seen.push(text);
                if hit {
                    return true;
                }
            }
        }
        false
    };
    assert!(
        read_until(&mut seen, "READY=1", Duration::from_secs(10)),
        "{seen:?}"
    );
    // At least two pings within a second of being ready.
    assert!(
        read_until(&mut seen, "WATCHDOG=1", Duration::from_secs(2)),
        "{seen:?}"
    );
    assert!(
        read_until(&mut seen, "WATCHDOG=1", Duration::from_secs(2)),
        "{seen:?}"
    );
    daemon.signal(Signal::SIGTERM);
    assert!(
        read_until(&mut seen, "STOPPING=1", Duration::from_secs(10)),
        "{seen:?}"
    );
    let (code, _) = daemon.wait(Duration::from_secs(15)).await;
    assert_eq!(code, Some(0));
    let first = |want: &str| seen.iter().position(|s| s == want);
    let (ready, ping, stopping) = (first("READY=1"), first("WATCHDOG=1"), first("STOPPING=1"));
    println!("notifications: {seen:?}");
    assert!(ready < ping && ping < stopping, "order: {seen:?}");
    env.cleanup().await;
}
