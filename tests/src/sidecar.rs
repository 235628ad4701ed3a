//! Starting real `strata-sidecar` processes for end-to-end tests: free
//! loopback ports for the outbound proxy, the admin server and each TCP
//! route; readiness by polling `/readyz`; killed when the handle drops.

use std::net::SocketAddr;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::{free_port, http_get, stratad_bin};

/// Path of the `strata-sidecar` binary, built next to `stratad`.
pub fn sidecar_bin() -> std::path::PathBuf {
    stratad_bin().with_file_name("strata-sidecar")
}

/// A running sidecar.
pub struct Sidecar {
    child: Child,
    /// Outbound HTTP proxy address.
    pub outbound: SocketAddr,
    /// Admin address.
    pub admin: SocketAddr,
    /// TCP route addresses, in the order given.
    pub tcp: Vec<SocketAddr>,
    stderr: Arc<Mutex<String>>,
}

impl Sidecar {
    /// Starts a sidecar for `tenant` of `project` against `endpoint` with
    /// a TCP route per service in `tcp`, plus `extra` arguments, and waits
    /// until it is ready (its own tenant's routes arrived).
    pub async fn start(
        endpoint: &str,
        project: &str,
        tenant: &str,
        tcp: &[&str],
        extra: &[&str],
    ) -> Sidecar {
        Self::start_with_env(endpoint, project, tenant, tcp, extra, &[]).await
    }

    /// [`Sidecar::start`] with environment variables for the child (its
    /// environment is otherwise cleared), e.g. `OTEL_EXPORTER_OTLP_ENDPOINT`.
    pub async fn start_with_env(
        endpoint: &str,
        project: &str,
        tenant: &str,
        tcp: &[&str],
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Sidecar {
        let outbound: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let tcp_addrs: Vec<SocketAddr> = tcp
            .iter()
            .map(|_| format!("127.0.0.1:{}", free_port()).parse().unwrap())
            .collect();
        let mut command = Command::new(sidecar_bin());
        command
            .args([
                "--endpoints",
                endpoint,
                "--project",
                project,
                "--tenant",
                tenant,
            ])
            .arg("--outbound")
            .arg(outbound.to_string())
            .arg("--admin")
            .arg(admin.to_string())
            .args(["--log", "info,strata_sidecar=debug"]);
        for (addr, service) in tcp_addrs.iter().zip(tcp) {
            command.arg("--tcp").arg(format!("{addr}={service}"));
        }
        command
            .args(extra)
            .env_clear()
            .env("RUST_BACKTRACE", "1")
            // The admin token of the daemon at `endpoint`, when this process started it.
            .envs(
                endpoint
                    .trim_start_matches("http://")
                    .parse()
                    .ok()
                    .and_then(crate::token_for)
                    .map(|t| ("STRATA_TOKEN", t)),
            )
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = command.spawn().expect("spawn strata-sidecar");
        let stderr = Arc::new(Mutex::new(String::new()));
        let pipe = child.stderr.take().expect("stderr pipe");
        let sink = Arc::clone(&stderr);
        tokio::spawn(async move {
            let mut lines = BufReader::new(pipe).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let mut s = sink.lock().unwrap();
                s.push_str(&line);
                s.push('\n');
            }
        });
        let mut sidecar = Sidecar {
            child,
            outbound,
            admin,
            tcp: tcp_addrs,
            stderr,
        };
        sidecar.wait_ready(Duration::from_secs(20)).await;
        sidecar
    }

    /// Everything it wrote to stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Process id.
    pub fn pid(&self) -> i32 {
        i32::try_from(self.child.id().expect("running")).unwrap()
    }

    /// Sends a signal.
    pub fn signal(&self, signal: Signal) {
        let pid = Pid::from_raw(i32::try_from(self.child.id().expect("running")).unwrap());
        kill(pid, signal).expect("signal sidecar");
    }

    /// Polls `/readyz` until 200; panics with its stderr otherwise.
    pub async fn wait_ready(&mut self, timeout: Duration) {
        let stderr = Arc::clone(&self.stderr);
        crate::poll_ready(
            &mut self.child,
            self.admin,
            "strata-sidecar",
            timeout,
            || stderr.lock().unwrap().clone(),
        )
        .await;
    }

    /// `GET /routes`, parsed.
    pub async fn routes(&self) -> serde_json::Value {
        let (status, body) = http_get(self.admin, "/routes").await.expect("GET /routes");
        assert_eq!(status, 200, "{body}");
        serde_json::from_str(&body).expect("routes JSON")
    }

    /// `GET /metrics` text.
    pub async fn metrics(&self) -> String {
        http_get(self.admin, "/metrics")
            .await
            .expect("GET /metrics")
            .1
    }

    /// Waits for the process to exit; panics after `timeout`.
    pub async fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        match tokio::time::timeout(timeout, self.child.wait()).await {
            Ok(status) => status.expect("wait for strata-sidecar"),
            Err(_) => panic!(
                "strata-sidecar still running after {timeout:?}; stderr:\n{}",
                self.stderr()
            ),
        }
    }
}
