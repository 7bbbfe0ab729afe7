//! The sdfleet binary as processes of the test: controllers (each with its own flags,
//! identity and metrics port, killed when the test ends) and any child to kill on drop.
//! The demo and the benchmarks start their long-lived controller with
//! `tests/testbed/testbed start-controller` instead; a test needs several at once, each
//! tied to its own lifetime, which a process the testbed tracks cannot give.

use std::path::PathBuf;

use super::http::http_get;
use super::testbed::Testbed;

/// The real controller binary, run as a process against the testbed, watching one
/// namespace. Killed when dropped.
pub struct ControllerProcess {
    pub child: std::process::Child,
    pub metrics_port: u16,
    args: Vec<String>,
    env: Vec<(String, String)>,
}

/// The `sdfleet` binary under test: this build's, or `SDFLEET_TEST_BIN` (another build's,
/// e.g. main's, to see a new test fail before its fix, or a benchmark's peer).
/// The cluster flags every test controller runs with (`--cloud` first, so that a test's
/// own `--cloud` can replace it); `sdfleet render` takes the same.
pub const CLUSTER_ARGS: &[&str] = &[
    "--cloud",
    "kwok",
    "--cluster-name",
    "testbed",
    "--region",
    "us-west-2",
];

pub fn sdfleet_bin() -> PathBuf {
    std::env::var_os("SDFLEET_TEST_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_sdfleet")))
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl ControllerProcess {
    pub fn start(tb: &Testbed, namespace: &str, extra: &[&str]) -> ControllerProcess {
        Self::start_with_env(tb, namespace, extra, &[])
    }

    /// As `start`, with extra environment (e.g. `KUBECONFIG` of another identity, `POD_NAME`).
    pub fn start_with_env(
        tb: &Testbed,
        namespace: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> ControllerProcess {
        let mut args: Vec<String> = ["controller"]
            .iter()
            .chain(CLUSTER_ARGS)
            .chain(&["--namespace", namespace])
            .map(|s| s.to_string())
            .collect();
        // A `--cloud` of the caller's replaces the default.
        if extra.contains(&"--cloud") {
            args.drain(1..3);
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Self::spawn(tb, args, env)
    }

    fn spawn(tb: &Testbed, args: Vec<String>, env: Vec<(String, String)>) -> ControllerProcess {
        let metrics_port = free_port();
        let log = std::fs::File::create(std::env::temp_dir().join(format!(
            "sdfleet-controller-{metrics_port}-{}.log",
            super::testbed::unique_suffix()
        )))
        .unwrap();
        let child = std::process::Command::new(sdfleet_bin())
            .args(&args)
            .arg("--metrics-addr")
            .arg(format!("127.0.0.1:{metrics_port}"))
            .env("KUBECONFIG", tb.kubeconfig())
            .env("RUST_LOG", "info,sdfleet=debug")
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start sdfleet controller");
        ControllerProcess {
            child,
            metrics_port,
            args,
            env,
        }
    }

    /// Kills the process (SIGKILL, as a crash would) and starts a new one with the same flags.
    pub fn restart_after_kill(&mut self, tb: &Testbed) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
        *self = Self::spawn(tb, self.args.clone(), self.env.clone());
    }

    /// Sends SIGTERM and waits (at most 20 s) for the exit status.
    pub async fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        assert!(
            std::process::Command::new("kill")
                .args(["-TERM", &pid])
                .status()
                .unwrap()
                .success()
        );
        for _ in 0..100 {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
        panic!("the controller did not exit within 20 s of SIGTERM");
    }

    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// `/metrics` of the controller, or None while it is not serving.
    pub async fn metrics(&self) -> Option<String> {
        http_get(self.metrics_port, "/metrics").await
    }

    /// The sum of every sample of `family` in `/metrics`.
    pub async fn metric_sum(&self, family: &str) -> Option<f64> {
        let text = self.metrics().await?;
        Some(
            text.lines()
                .filter(|l| l.starts_with(family) && !l.starts_with('#'))
                .filter(|l| l[family.len()..].starts_with(['{', ' ']))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum(),
        )
    }
}

impl Drop for ControllerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A child process that is killed when the test ends, passing or panicking.
pub struct KillOnDrop(pub std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
