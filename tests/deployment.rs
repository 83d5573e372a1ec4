//! The production shape of a deployment: a worker registers the test handlers only when asked
//! (`worker.test_handlers`), and the services run with migrations as a separate step
//! (`taskfleet migrate`) under a Postgres role without DDL rights, over TLS.

use std::time::{Duration, Instant};
use taskfleet_e2e::Fleet;
use taskfleet_proto::TaskEnvelope;
use taskfleet_test_support::FleetProcess;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_without_test_handlers_fails_sleep_and_fanout_as_unknown_kinds() {
    let mut fleet = Fleet::new("no_test_handlers");
    fleet.start_coordinator();
    // The suite turns the test handlers on for every process; this worker is a production one.
    fleet.start_worker(&[("TASKFLEET_WORKER_TEST_HANDLERS", "false")]);
    let client = fleet.nats().await;
    let tasks = [
        TaskEnvelope::new("sleep", serde_json::json!({"ms": 1})),
        TaskEnvelope::new("fanout", serde_json::json!({"count": 2, "kind": "echo"})),
        TaskEnvelope::new("echo", serde_json::json!({"text": "hi"})),
    ];
    fleet.submit_all(&client, &tasks).await;
    let pool = fleet.env.pg_pool().await;
    fleet.wait_final(&pool, 3, Duration::from_secs(60)).await;
    let rows: Vec<(String, String, Option<String>, Option<String>)> =
        sqlx::query_as("SELECT kind, state, error->>'code', error->>'message' FROM tasks ORDER BY kind")
            .fetch_all(&pool)
            .await
            .expect("read tasks");
    let summary: Vec<(&str, &str, Option<&str>)> =
        rows.iter().map(|(kind, state, code, _)| (kind.as_str(), state.as_str(), code.as_deref())).collect();
    assert_eq!(
        summary,
        [
            ("echo", "succeeded", None),
            ("fanout", "failed", Some("unknown_kind")),
            ("sleep", "failed", Some("unknown_kind"))
        ],
        "{rows:?}"
    );
    let message = rows[2].3.as_deref().unwrap_or_default();
    let (_, known) =
        message.split_once("knows").unwrap_or_else(|| panic!("the error lists the known kinds: {message}"));
    assert!(message.starts_with("no handler for kind \"sleep\"") && known.contains("\"echo\""), "{message}");
    assert!(!known.contains("\"sleep\"") && !known.contains("\"fanout\""), "{message}");
}

/// A Postgres role, dropped (with its privileges) when this drops.
struct Role {
    owner_url: String,
    name: String,
}

impl Drop for Role {
    fn drop(&mut self) {
        let (url, name) = (self.owner_url.clone(), self.name.clone());
        let _ = std::thread::spawn(move || {
            if let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() {
                rt.block_on(async {
                    use sqlx::Connection;
                    if let Ok(mut conn) = sqlx::PgConnection::connect(&url).await {
                        for sql in [format!("DROP OWNED BY \"{name}\""), format!("DROP ROLE IF EXISTS \"{name}\"")] {
                            let _ = sqlx::query(sqlx::AssertSqlSafe(sql)).execute(&mut conn).await;
                        }
                    }
                });
            }
        })
        .join();
    }
}

/// `url` with its user and password replaced.
fn with_user(url: &str, user: &str, password: &str) -> String {
    let (scheme, rest) = url.split_once("://").expect("database URL has a scheme");
    let host = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
    format!("{scheme}://{user}:{password}@{host}")
}

/// `url` with one more query parameter.
fn with_param(url: &str, param: &str) -> String {
    format!("{url}{}{param}", if url.contains('?') { '&' } else { '?' })
}

/// Waits for a process to exit, for at most `timeout`.
fn wait_exit(process: &mut FleetProcess, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while process.is_running() {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    true
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_run_on_a_role_without_ddl_rights_after_taskfleet_migrate() {
    // Declared before the fleet, so dropped after it: its processes are gone by then.
    let role = Role {
        owner_url: taskfleet_test_support::database_url(),
        name: format!("tf_app_{}", &uuid::Uuid::new_v4().simple().to_string()[..12]),
    };
    let mut fleet = Fleet::new("limited_role");
    let owner_url = fleet.env.database_url.clone();
    let schema = fleet.env.schema.clone();
    let owner = fleet.env.pg_pool().await;
    let password = uuid::Uuid::new_v4().simple().to_string();
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE ROLE \"{}\" LOGIN PASSWORD '{password}'", role.name)))
        .execute(&owner)
        .await
        .expect("create the limited role");
    // The services connect as the limited role over TLS (the local server's certificate is not
    // one the test can verify, so `require`: encrypted, unchecked).
    let limited_url = with_param(&with_user(&owner_url, &role.name, &password), "sslmode=require");
    fleet.use_database(&limited_url).set("TASKFLEET_DATABASE_MIGRATE_ON_START", "false");

    // Before `taskfleet migrate`: the coordinator refuses to start, naming the command.
    let mut early = FleetProcess::spawn(
        "taskfleet-coordinator",
        &[],
        &[
            fleet.env.fleet_env(),
            vec![
                ("TASKFLEET_DATABASE_MIGRATE_ON_START".into(), "false".into()),
                ("TASKFLEET_COORDINATOR_HTTP_ADDR".into(), fleet.coordinator_http.clone()),
            ],
        ]
        .concat(),
    );
    assert!(wait_exit(&mut early, Duration::from_secs(30)), "an unmigrated coordinator kept running:\n{}", early.log());
    let log = early.log();
    assert!(log.contains("no taskfleet migrations applied") && log.contains("`taskfleet migrate`"), "{log}");

    // The migration step, as the owner.
    let migrate = |fleet: &Fleet| {
        let bin = taskfleet_test_support::target_dir().join("taskfleet");
        let mut env = fleet.env.fleet_env();
        env.push(("TASKFLEET_DATABASE_URL".into(), owner_url.clone()));
        let out = std::process::Command::new(bin).arg("migrate").envs(env).output().expect("run taskfleet migrate");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success(), "taskfleet migrate failed: {stdout}{}", String::from_utf8_lossy(&out.stderr));
        stdout
    };
    let first = migrate(&fleet);
    assert!(first.starts_with(&format!("schema {schema}: applied ")) && first.contains("0001 tasks"), "{first}");
    assert_eq!(migrate(&fleet), format!("schema {schema}: up to date\n"));
    for grant in [
        format!("GRANT USAGE ON SCHEMA \"{schema}\" TO \"{}\"", role.name),
        format!("GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA \"{schema}\" TO \"{}\"", role.name),
        format!("GRANT USAGE ON ALL SEQUENCES IN SCHEMA \"{schema}\" TO \"{}\"", role.name),
    ] {
        sqlx::query(sqlx::AssertSqlSafe(grant)).execute(&owner).await.expect("grant");
    }

    fleet.start_coordinator();
    fleet.start_aggregator();
    fleet.start_worker(&[]);
    let client = fleet.nats().await;
    let tasks: Vec<TaskEnvelope> = (0..20).map(|i| TaskEnvelope::new("echo", serde_json::json!({ "i": i }))).collect();
    fleet.submit_all(&client, &tasks).await;
    let counts = fleet.wait_final(&owner, 20, Duration::from_secs(60)).await;
    assert_eq!(counts.get("succeeded"), Some(&20), "{counts:?}\n{}", fleet.logs());

    // The services' connections are the limited role's, encrypted.
    let (sessions, encrypted): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(*) FILTER (WHERE s.ssl) FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) \
         WHERE a.usename = $1",
    )
    .bind(&role.name)
    .fetch_one(&owner)
    .await
    .expect("read sessions");
    assert!(sessions > 0 && encrypted == sessions, "{encrypted} of {sessions} sessions of the role use TLS");

    // And that role cannot change the schema.
    let limited = {
        use std::str::FromStr;
        let options = sqlx::postgres::PgConnectOptions::from_str(&limited_url).expect("limited URL");
        sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .connect_with(options)
            .await
            .expect("connect as the role")
    };
    for ddl in [
        format!("CREATE TABLE \"{schema}\".intruder (a int)"),
        format!("ALTER TABLE \"{schema}\".tasks ADD COLUMN intruder int"),
        format!("DROP TABLE \"{schema}\".task_attempts"),
        format!("CREATE SCHEMA \"{schema}_intruder\""),
        format!("TRUNCATE \"{schema}\".tasks"),
    ] {
        let refused = sqlx::query(sqlx::AssertSqlSafe(ddl.clone())).execute(&limited).await.expect_err(&ddl);
        let code = refused.as_database_error().and_then(|e| e.code()).map(|c| c.into_owned());
        assert_eq!(code.as_deref(), Some("42501"), "{ddl}: {refused}");
    }
    let counted: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT count(*) FROM \"{schema}\".tasks")))
        .fetch_one(&limited)
        .await
        .expect("the role reads its tables");
    assert_eq!(counted, 20);
    limited.close().await;
}
