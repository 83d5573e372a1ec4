//! Starting taskfleet binaries and talking HTTP to them.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use taskfleet_proto::Role;

/// A TCP port that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free port")
}

/// The cargo target directory holding the test's sibling binaries (`target/debug`).
pub fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // target/debug/deps/<test-binary>
    exe.parent().and_then(|p| p.parent()).map(|p| p.to_path_buf()).expect("target dir")
}

/// A running taskfleet binary; killed (SIGKILL) on drop. Its output goes to a log file that
/// [`FleetProcess::log`] reads back.
pub struct FleetProcess {
    /// Binary name.
    pub name: String,
    child: Option<Child>,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

/// Set to `1` in a [`crate::TestEnv::fleet_env`] whose NATS server checks users: then
/// [`FleetProcess::spawn`] logs each binary in as its role.
pub(crate) const ROLES_MARKER: &str = "TASKFLEET_TEST_NATS_ROLES";

/// The NATS role each binary runs as in tests (the CLI and the examples act as operators).
fn role_of(bin: &str) -> Option<Role> {
    match bin {
        "taskfleet-coordinator" => Some(Role::Coordinator),
        "taskfleet-worker" => Some(Role::Worker),
        "taskfleet-aggregator" => Some(Role::Aggregator),
        "taskfleet" | "taskfleet-examples" => Some(Role::Admin),
        _ => None,
    }
}

/// `TASKFLEET_NATS_USER`/`_PASSWORD` of `bin`'s role, when `env` marks a server with
/// authorization and names no user itself: what [`FleetProcess::spawn`] adds, for a test that
/// runs a binary another way.
pub fn role_credentials(bin: &str, env: &[(String, String)]) -> Vec<(String, String)> {
    let marked = env.iter().any(|(k, v)| k == ROLES_MARKER && v == "1");
    let named = env.iter().any(|(k, _)| k == "TASKFLEET_NATS_USER" || k == "TASKFLEET_NATS_CREDS_FILE");
    match role_of(bin) {
        Some(role) if marked && !named => vec![
            ("TASKFLEET_NATS_USER".into(), role.as_str().into()),
            ("TASKFLEET_NATS_PASSWORD".into(), crate::role_password(role)),
        ],
        _ => Vec::new(),
    }
}

impl FleetProcess {
    /// Starts `target/debug/<bin>` with `args` and the extra environment `env`.
    pub fn spawn(bin: &str, args: &[&str], env: &[(String, String)]) -> FleetProcess {
        let path = target_dir().join(bin);
        assert!(path.is_file(), "{} is not built (run cargo build --workspace)", path.display());
        let dir = tempfile::tempdir().expect("temp dir");
        let log = dir.path().join(format!("{bin}.log"));
        let file = std::fs::File::create(&log).expect("log file");
        let child = Command::new(&path)
            .args(args)
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .envs(role_credentials(bin, env))
            .stdout(file.try_clone().expect("log file"))
            .stderr(file)
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", path.display()));
        FleetProcess { name: bin.to_string(), child: Some(child), log, _dir: dir }
    }

    /// Everything the process has written so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// True while the process has not exited.
    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Sends SIGTERM and waits up to `timeout` for the exit; returns the exit code.
    pub fn terminate(&mut self, timeout: Duration) -> Option<i32> {
        let pid = self.pid()?;
        let _ = Command::new("kill").args(["-TERM", &pid.to_string()]).status();
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                self.child = None;
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Kills the process with SIGKILL.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Waits until `GET http://<addr><path>` answers 200, or panics with the log.
    pub fn wait_http_ok(&mut self, addr: &str, path: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok((200, _)) = http_get(addr, path) {
                return;
            }
            if !self.is_running() || Instant::now() > deadline {
                panic!("{} did not become ready on {addr}{path}; log:\n{}", self.name, self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for FleetProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A bare HTTP/1.1 GET: returns status code and body.
pub fn http_get(addr: &str, path: &str) -> std::io::Result<(u16, String)> {
    http_request(addr, "GET", path, &[]).map(|a| (a.status, a.body))
}

/// An HTTP answer: status, headers (names lower-cased) and body.
#[derive(Debug, Clone)]
pub struct HttpAnswer {
    /// Status code.
    pub status: u16,
    /// Headers, names in lower case.
    pub headers: Vec<(String, String)>,
    /// Body (a chunked one decoded).
    pub body: String,
}

impl HttpAnswer {
    /// The first header named `name` (lower case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

/// A bare HTTP/1.1 request with extra headers and an empty body.
pub fn http_request(addr: &str, method: &str, path: &str, headers: &[(&str, &str)]) -> std::io::Result<HttpAnswer> {
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: 0\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes())?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").map_or(raw.len(), |p| p + 4);
    let (head, body) = raw.split_at(split);
    let head = String::from_utf8_lossy(head);
    let mut lines = head.lines();
    let status = lines.next().and_then(|l| l.split_whitespace().nth(1)).and_then(|s| s.parse().ok()).unwrap_or(0);
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let chunked = headers.iter().any(|(k, v)| k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked"));
    let body = String::from_utf8_lossy(&if chunked { dechunk(body) } else { body.to_vec() }).into_owned();
    Ok(HttpAnswer { status, headers, body })
}

/// The content of a chunked body.
fn dechunk(mut rest: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = rest.windows(2).position(|w| w == b"\r\n") {
        let line = String::from_utf8_lossy(&rest[..eol]);
        let size = usize::from_str_radix(line.split(';').next().unwrap_or("").trim(), 16).unwrap_or(0);
        let after = &rest[eol + 2..];
        if size == 0 || after.len() < size {
            break;
        }
        out.extend_from_slice(&after[..size]);
        rest = after[size..].strip_prefix(b"\r\n").unwrap_or(&after[size..]);
    }
    out
}
