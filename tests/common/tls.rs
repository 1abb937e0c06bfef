//! Throwaway TLS endpoints for the TLS tests: a CA, an unrelated CA, a
//! server certificate for `localhost`/127.0.0.1 and one for another host
//! name (made with the `openssl` CLI, which `scripts/setup` installs), and
//! a `socat` TLS terminator in front of a plaintext port, killed on drop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A directory of certificates, gone when dropped.
pub struct Pki {
    dir: tempfile::TempDir,
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run openssl (scripts/setup installs it)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

const EC: [&str; 4] = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"];

impl Pki {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let d = dir.path();
        for ca in ["ca", "other-ca"] {
            let mut args = vec!["req", "-x509", "-nodes", "-days", "2"];
            args.extend(EC);
            let subj = format!("/CN=conveyor test {ca}");
            let (key, pem) = (format!("{ca}.key"), format!("{ca}.pem"));
            args.extend(["-keyout", &key, "-out", &pem, "-subj", &subj]);
            openssl(d, &args);
        }
        for (name, san) in [
            ("server", "subjectAltName=DNS:localhost,IP:127.0.0.1"),
            ("wronghost", "subjectAltName=DNS:elsewhere.invalid"),
            ("client", "extendedKeyUsage=clientAuth"),
        ] {
            let (key, csr, crt, ext) = (
                format!("{name}.key"),
                format!("{name}.csr"),
                format!("{name}.crt"),
                format!("{name}.ext"),
            );
            std::fs::write(d.join(&ext), format!("{san}\n")).expect("extension file");
            let mut args = vec!["req", "-nodes"];
            args.extend(EC);
            let subj = format!("/CN={name}");
            args.extend(["-keyout", &key, "-out", &csr, "-subj", &subj]);
            openssl(d, &args);
            openssl(
                d,
                &[
                    "x509",
                    "-req",
                    "-in",
                    &csr,
                    "-CA",
                    "ca.pem",
                    "-CAkey",
                    "ca.key",
                    "-CAcreateserial",
                    "-days",
                    "2",
                    "-out",
                    &crt,
                    "-extfile",
                    &ext,
                ],
            );
            let both = format!(
                "{}{}",
                std::fs::read_to_string(d.join(&crt)).expect("cert"),
                std::fs::read_to_string(d.join(&key)).expect("key")
            );
            std::fs::write(d.join(format!("{name}.pem")), both).expect("cert + key");
        }
        Self { dir }
    }

    /// `ca.pem`, `other-ca.pem`, `server.pem` (cert + key), `server.crt`,
    /// `server.key`, `wronghost.pem`, `client.crt`, `client.key`…
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// `socat` terminating TLS on `port` with `cert_and_key` and forwarding in
/// plaintext to `upstream`; killed on drop.
pub struct Terminator {
    child: Child,
    pub port: u16,
}

impl Terminator {
    pub async fn start(port: u16, cert_and_key: &Path, upstream: u16) -> Self {
        Self::start_with(port, cert_and_key, None, upstream).await
    }

    /// As `start`; with `client_ca`, a client must present a certificate
    /// signed by it (mutual TLS).
    pub async fn start_with(
        port: u16,
        cert_and_key: &Path,
        client_ca: Option<&Path>,
        upstream: u16,
    ) -> Self {
        let verify = match client_ca {
            Some(ca) => format!("verify=1,cafile={}", ca.display()),
            None => "verify=0".to_string(),
        };
        let listen = format!(
            "openssl-listen:{port},bind=127.0.0.1,reuseaddr,fork,cert={},{verify}",
            cert_and_key.display()
        );
        let child = Command::new("socat")
            .args([&listen, &format!("tcp:127.0.0.1:{upstream}")])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start socat (scripts/setup installs it)");
        let deadline = Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            assert!(Instant::now() < deadline, "socat not listening on {port}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Self { child, port }
    }
}

impl Drop for Terminator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
