//! The store against a real Postgres, each test in its own schema.

use taskfleet_config::DatabaseConfig;
use taskfleet_proto::{
    EventKind, NodeSpec, OnFailure, Priority, RunSpec, RunState, Spawn, TaskEnvelope, TaskErrorInfo, TaskEvent,
    TaskState, Timings, plan_nodes,
};
use taskfleet_store::{Store, StoreError};
use taskfleet_test_support::{database_url, unique_name};

struct Schema {
    store: Store,
}

impl Schema {
    async fn new(test: &str) -> Schema {
        let cfg = DatabaseConfig {
            url: database_url(),
            schema: format!("t_{}", unique_name(test)),
            max_connections: 4,
            ..DatabaseConfig::default()
        };
        Schema { store: Store::connect(&cfg).await.expect("connect store") }
    }
}

impl Drop for Schema {
    fn drop(&mut self) {
        let url = database_url();
        let schema = self.store.schema().to_string();
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                use sqlx::Connection;
                let mut c = sqlx::PgConnection::connect(&url).await.unwrap();
                sqlx::query(sqlx::AssertSqlSafe(format!("DROP SCHEMA \"{schema}\" CASCADE")))
                    .execute(&mut c)
                    .await
                    .unwrap();
            })
        })
        .join();
    }
}

fn event(env: &TaskEnvelope, kind: EventKind, attempt: u32) -> TaskEvent {
    let mut ev = TaskEvent::new(env.id, kind, &env.queue);
    ev.attempt = attempt;
    ev.timings =
        Some(Timings { created_at: env.created_at, received_at: ev.at, started_at: ev.at, finished_at: ev.at });
    if kind == EventKind::Succeeded {
        ev.result = Some(serde_json::json!({"ok": attempt}));
    }
    if matches!(kind, EventKind::Failed | EventKind::Retrying | EventKind::Dead) {
        ev.error = Some(TaskErrorInfo {
            code: "handler_error".into(),
            message: "boom".into(),
            retryable: kind == EventKind::Retrying,
        });
    }
    ev
}

#[tokio::test]
async fn batch_insert_duplicates_and_one_final_state() {
    let s = Schema::new("store_batch").await;
    let tasks: Vec<TaskEnvelope> = (0..500)
        .map(|i| TaskEnvelope::new("echo", serde_json::json!({ "i": i })).with_priority(Priority::ALL[i % 4]))
        .collect();
    let out = s.store.insert_tasks(&tasks).await.unwrap();
    assert_eq!(out.inserted.len(), 500);
    assert_eq!(out.dispatch.len(), 500);

    // The same batch again writes nothing; as a JetStream redelivery it is dispatched again
    // because the rows are still queued, as a fresh resubmission it is not.
    let again = s.store.insert_submissions(&tasks[..10], &[true; 10]).await.unwrap();
    assert!(again.inserted.is_empty());
    assert_eq!(again.duplicates.len(), 10);
    assert_eq!(again.dispatch.len(), 10);
    let fresh = s.store.insert_tasks(&tasks[..10]).await.unwrap();
    assert_eq!(fresh.duplicates.len(), 10);
    assert!(fresh.dispatch.is_empty(), "a client's duplicate must not be dispatched twice");
    // Twice in one batch: one task, one dispatch, one duplicate.
    let x = TaskEnvelope::new("echo", serde_json::json!("x"));
    let twice = s.store.insert_tasks(&[x.clone(), x.clone()]).await.unwrap();
    assert_eq!((twice.inserted.len(), twice.dispatch.clone(), twice.duplicates.len()), (1, vec![0], 1));

    // Idempotency key: a different id with the same key returns the first task's id.
    let mut a = TaskEnvelope::new("echo", serde_json::json!(1));
    a.idempotency_key = Some("order-42".into());
    let mut b = TaskEnvelope::new("echo", serde_json::json!(2));
    b.idempotency_key = Some("order-42".into());
    s.store.insert_tasks(std::slice::from_ref(&a)).await.unwrap();
    let dup = s.store.insert_tasks(std::slice::from_ref(&b)).await.unwrap();
    assert_eq!(dup.duplicates.len(), 1);
    assert_eq!(dup.duplicates[0].existing, a.id);
    assert!(dup.dispatch.is_empty());

    // Events: every task succeeds; duplicates and a late failure change nothing.
    let mut events: Vec<TaskEvent> = tasks.iter().map(|t| event(t, EventKind::Succeeded, 1)).collect();
    events.push(event(&tasks[0], EventKind::Succeeded, 1));
    let rec = s.store.record_events(&events).await.unwrap();
    assert_eq!(rec.finalized.len(), 500);
    assert_eq!(rec.ignored, 1);
    let late = s
        .store
        .record_events(&[event(&tasks[1], EventKind::Failed, 2), event(&tasks[2], EventKind::Started, 2)])
        .await
        .unwrap();
    assert!(late.finalized.is_empty());
    assert_eq!(late.ignored, 2);
    let rec = s.store.get_task(tasks[1].id).await.unwrap().unwrap();
    assert_eq!(rec.state, "succeeded");
    assert_eq!(rec.result, Some(serde_json::json!({"ok": 1})));
    let counts = s.store.count_by_state(None).await.unwrap();
    assert!(counts.contains(&("succeeded".to_string(), 500)), "{counts:?}");
    let attempts: i64 =
        sqlx::query_scalar("SELECT count(*) FROM task_attempts").fetch_one(s.store.pool()).await.unwrap();
    // 500 first attempts plus the late attempt 2 of tasks[1]: it did run, so it is history,
    // but it changed no final state.
    assert_eq!(attempts, 501);
}

#[tokio::test]
async fn retries_then_dead() {
    let s = Schema::new("store_retry").await;
    let t = TaskEnvelope::new("flaky", serde_json::json!(null));
    s.store.insert_tasks(std::slice::from_ref(&t)).await.unwrap();
    s.store.record_events(&[event(&t, EventKind::Retrying, 1)]).await.unwrap();
    assert_eq!(s.store.get_task(t.id).await.unwrap().unwrap().state, "retrying");
    // A stale started event of attempt 1 after attempt 2 started is ignored.
    s.store.record_events(&[event(&t, EventKind::Started, 2)]).await.unwrap();
    let stale = s.store.record_events(&[event(&t, EventKind::Started, 1)]).await.unwrap();
    assert_eq!(stale.ignored, 1);
    let out = s.store.record_events(&[event(&t, EventKind::Retrying, 2), event(&t, EventKind::Dead, 3)]).await.unwrap();
    assert_eq!(out.finalized.len(), 1);
    assert_eq!(out.finalized[0].state, TaskState::Dead);
    let attempts: i64 = sqlx::query_scalar("SELECT count(*) FROM task_attempts WHERE task_id = $1")
        .bind(t.id)
        .fetch_one(s.store.pool())
        .await
        .unwrap();
    assert_eq!(attempts, 3);
    // The dead task reads back whole, for the dead-letter stream and for a replay.
    let dead = s.store.envelopes_with_error(&[t.id]).await.unwrap();
    assert_eq!((dead[0].0.id, dead[0].0.created_at, &dead[0].0.kind), (t.id, t.created_at, &t.kind));
    assert_eq!(dead[0].1.as_ref().and_then(|e| e.get("code")), Some(&serde_json::json!("handler_error")));
    let replayed = s.store.replay_dead(Some(&[t.id]), None, 10).await.unwrap();
    assert_eq!((replayed[0].envelope.id, replayed[0].attempt_offset, replayed[0].generation), (t.id, 3, 2));
}

#[tokio::test]
async fn dependencies_release_and_cancel() {
    let s = Schema::new("store_deps").await;
    let a = TaskEnvelope::new("echo", serde_json::json!("a"));
    let b = TaskEnvelope::new("echo", serde_json::json!("b"));
    let mut c = TaskEnvelope::new("echo", serde_json::json!("c"));
    c.depends_on = vec![a.id, b.id];
    let mut d = TaskEnvelope::new("echo", serde_json::json!("d"));
    d.depends_on = vec![c.id];
    let mut bad = TaskEnvelope::new("echo", serde_json::json!("bad"));
    bad.depends_on = vec![uuid::Uuid::now_v7()];
    let out = s.store.insert_tasks(&[a.clone(), b.clone(), c.clone(), d.clone(), bad.clone()]).await.unwrap();
    assert_eq!(out.dispatch, vec![0, 1]);
    assert_eq!(out.rejected.len(), 1);
    assert_eq!(out.rejected[0].index, 4);

    let r1 = s.store.record_events(&[event(&a, EventKind::Succeeded, 1)]).await.unwrap();
    assert!(r1.released.is_empty(), "c still waits for b");
    let r2 = s.store.record_events(&[event(&b, EventKind::Succeeded, 1)]).await.unwrap();
    assert_eq!(r2.released.len(), 1);
    assert_eq!(r2.released[0].envelope.id, c.id);
    assert_eq!(r2.released[0].envelope.payload, serde_json::json!("c"));
    let parents: Vec<_> = r2.released[0].envelope.parents.iter().map(|p| (p.id, p.state, p.result.clone())).collect();
    assert_eq!(
        parents,
        [
            (a.id, TaskState::Succeeded, Some(serde_json::json!({"ok": 1}))),
            (b.id, TaskState::Succeeded, Some(serde_json::json!({"ok": 1})))
        ],
        "a released dependent carries its parents' outcomes in depends_on order"
    );

    // c fails: d is cancelled, and a later dependent of c is written cancelled at once.
    let r3 = s.store.record_events(&[event(&c, EventKind::Failed, 1)]).await.unwrap();
    let states: Vec<_> = r3.finalized.iter().map(|f| (f.id, f.state)).collect();
    assert!(states.contains(&(d.id, TaskState::Cancelled)), "{states:?}");
    let mut e = TaskEnvelope::new("echo", serde_json::json!("e"));
    e.depends_on = vec![c.id];
    let out = s.store.insert_tasks(&[e.clone()]).await.unwrap();
    assert_eq!(out.cancelled, vec![e.id]);
    // A dependent of an already-succeeded task is dispatched at once.
    let mut f = TaskEnvelope::new("echo", serde_json::json!("f"));
    f.depends_on = vec![a.id];
    assert_eq!(s.store.insert_tasks(&[f]).await.unwrap().dispatch, vec![0]);
}

/// A result Postgres refuses (a NUL character, which `jsonb` cannot hold) ends its own task
/// `failed` with `result_unstorable`, and the other events of the batch are recorded.
#[tokio::test]
async fn an_unstorable_result_fails_its_task_and_spares_the_batch() {
    let s = Schema::new("store_unstorable").await;
    let tasks: Vec<TaskEnvelope> = (0..9).map(|i| TaskEnvelope::new("echo", serde_json::json!(i))).collect();
    s.store.insert_tasks(&tasks).await.unwrap();
    let mut events: Vec<TaskEvent> = tasks.iter().map(|t| event(t, EventKind::Succeeded, 1)).collect();
    events[4].result = Some(serde_json::json!({ "body": "a\u{0}b" }));
    let err = s.store.record_events(&events).await.expect_err("Postgres refuses a NUL in jsonb");
    assert!(err.is_data_error(), "{err}");

    let out = s.store.record_events_isolating(&events).await.unwrap();
    assert_eq!(out.unstorable, 1);
    assert_eq!(out.finalized.len(), 9);
    for (i, t) in tasks.iter().enumerate() {
        let row = s.store.get_task(t.id).await.unwrap().unwrap();
        if i == 4 {
            assert_eq!(row.state, "failed");
            let error = row.error.expect("an error");
            assert_eq!(error["code"], "result_unstorable");
            assert!(error["message"].as_str().unwrap().contains("Unicode"), "{error}");
        } else {
            assert_eq!(row.state, "succeeded", "task {i}");
        }
    }
}

/// A retry is recorded with the time it is due, and claimed for its next dispatch then (with
/// the attempts spent as the offset and the next generation); a message of the old generation
/// is then stale, and one of a final task is final.
#[tokio::test]
async fn retries_wait_in_postgres_until_due() {
    use taskfleet_proto::{Runnable, RunnableQuery};
    let s = Schema::new("store_retry_due").await;
    let t = TaskEnvelope::new("echo", serde_json::json!(1));
    s.store.insert_tasks(std::slice::from_ref(&t)).await.unwrap();
    let mut retry = event(&t, EventKind::Retrying, 1);
    retry.retry_in_ms = Some(300);
    s.store.record_events(&[retry]).await.unwrap();
    assert!(s.store.claim_due(10).await.unwrap().tasks.is_empty(), "not due yet");
    let ask = |generation| [RunnableQuery { id: t.id, generation }];
    assert_eq!(s.store.runnable(&ask(1)).await.unwrap().0, vec![Runnable::Stale], "its attempt asked for a retry");
    tokio::time::sleep(std::time::Duration::from_millis(400)).await;
    let claimed = s.store.claim_due(10).await.unwrap();
    assert_eq!(claimed.tasks.len(), 1);
    assert_eq!((claimed.tasks[0].attempt_offset, claimed.tasks[0].generation), (1, 2));
    claimed.commit().await.unwrap();
    assert!(s.store.claim_due(10).await.unwrap().tasks.is_empty(), "claimed once");
    assert_eq!(s.store.runnable(&ask(1)).await.unwrap().0, vec![Runnable::Stale]);
    assert_eq!(s.store.runnable(&ask(2)).await.unwrap().0, vec![Runnable::Run]);
    // A duplicate of the first generation's retry, arriving late, changes nothing: the second
    // generation stays the live one and no third dispatch is scheduled.
    let mut late = event(&t, EventKind::Retrying, 1);
    (late.generation, late.retry_in_ms) = (1, Some(0));
    let mut started = event(&t, EventKind::Started, 2);
    started.generation = 2;
    s.store.record_events(&[started]).await.unwrap();
    assert_eq!(s.store.record_events(&[late]).await.unwrap().ignored, 1);
    assert!(s.store.claim_due(10).await.unwrap().tasks.is_empty(), "no dispatch from a stale retry");
    assert_eq!(s.store.runnable(&ask(2)).await.unwrap().0, vec![Runnable::Run]);
    s.store.record_events(&[event(&t, EventKind::Succeeded, 2)]).await.unwrap();
    assert_eq!(s.store.runnable(&ask(2)).await.unwrap().0, vec![Runnable::Final]);
}

/// Rows Postgres refuses are found by splitting the batch and rejected as `unstorable` with the
/// database's words; the rest of the batch is written.
#[tokio::test]
async fn refused_rows_are_isolated_and_the_rest_is_written() {
    let s = Schema::new("store_poison").await;
    sqlx::query("ALTER TABLE tasks ADD CONSTRAINT no_poison CHECK (kind <> 'poison')")
        .execute(s.store.pool())
        .await
        .unwrap();
    let mut tasks: Vec<TaskEnvelope> = (0..40).map(|i| TaskEnvelope::new("echo", serde_json::json!(i))).collect();
    tasks[3].kind = "poison".into();
    tasks[17].payload = serde_json::json!({"text": "nul \u{0} here"}); // jsonb refuses it
    tasks[29].created_at = 300_000_000_000_000_000; // beyond timestamptz
    tasks[30].kind = "poison".into();
    // A dependent of a refused task is refused as well; one of a written task is pending.
    let mut child = TaskEnvelope::new("echo", serde_json::json!("child"));
    child.depends_on = vec![tasks[3].id];
    let mut ok_child = TaskEnvelope::new("echo", serde_json::json!("ok child"));
    ok_child.depends_on = vec![tasks[0].id];
    tasks.push(child);
    tasks.push(ok_child);

    let single = s.store.insert_tasks(&tasks[3..4]).await.unwrap();
    assert_eq!(single.rejected.len(), 1);
    let out = s.store.insert_tasks(&tasks).await.unwrap();
    let mut refused: Vec<(usize, taskfleet_proto::RejectReason, String)> =
        out.rejected.iter().map(|r| (r.index, r.reason, r.message.clone())).collect();
    refused.sort_by_key(|r| r.0);
    let idx: Vec<usize> = refused.iter().map(|r| r.0).collect();
    assert_eq!(idx, vec![3, 17, 29, 30, 40], "{refused:#?}");
    for (i, reason, message) in &refused[..4] {
        assert_eq!(*reason, taskfleet_proto::RejectReason::Unstorable, "{i}");
        assert!(message.contains("SQLSTATE"), "{i}: {message}");
    }
    assert!(refused[0].2.contains("no_poison"), "{}", refused[0].2);
    assert_eq!(refused[4].1, taskfleet_proto::RejectReason::UnknownDependency);
    assert_eq!(out.inserted.len(), 37);
    assert_eq!(out.dispatch.len(), 36, "every written dependency-free task is dispatched");
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM tasks").fetch_one(s.store.pool()).await.unwrap();
    assert_eq!(rows, 37);
}

/// Errors are classified so that callers retry an unavailable database and isolate bad data.
#[tokio::test]
async fn errors_tell_unavailable_from_refused_data() {
    let s = Schema::new("store_errors").await;
    let e = sqlx::query("SELECT '\\u0000'::jsonb").execute(s.store.pool()).await.map_err(StoreError::from).unwrap_err();
    assert!(e.is_data_error() && !e.is_unavailable(), "{e}");
    let e =
        sqlx::query("SELECT * FROM no_such_table").execute(s.store.pool()).await.map_err(StoreError::from).unwrap_err();
    assert!(!e.is_data_error() && !e.is_unavailable(), "{e}");
    let down = DatabaseConfig {
        url: "postgres://postgres@127.0.0.1:1/test".into(),
        schema: "x".into(),
        max_connections: 1,
        ..DatabaseConfig::default()
    };
    let e = Store::connect(&down).await.unwrap_err();
    assert!(e.is_unavailable() && !e.is_data_error(), "{e}");
}

/// The chord bug never happens: when a join's children end in many concurrent transactions
/// (as with several coordinators), exactly one of them releases the join, every time.
#[tokio::test]
async fn a_join_is_released_exactly_once_under_concurrent_commits() {
    let s = Schema::new("store_join_once").await;
    for round in 0..10 {
        let children: Vec<NodeSpec> =
            (0..40).map(|i| NodeSpec::new(format!("c{i}"), "echo", serde_json::json!(i))).collect();
        let names: Vec<String> = children.iter().map(|c| c.name.clone()).collect();
        let mut nodes = children;
        nodes.push(
            NodeSpec::new("join", "collect", serde_json::Value::Null)
                .after(&names.iter().map(String::as_str).collect::<Vec<_>>()),
        );
        let spec = RunSpec::new(nodes);
        let planned = plan_nodes(&spec.nodes, "default", Priority::Normal, 1 << 20).unwrap();
        let inserted = s.store.insert_run(&spec, &planned, None).await.unwrap();
        assert_eq!(inserted.ready.len(), 40);
        let recorders = inserted.ready.iter().map(|t| {
            let store = s.store.clone();
            let ev = event(&t.envelope, EventKind::Succeeded, 1);
            tokio::spawn(async move { store.record_events(&[ev]).await })
        });
        let mut released = 0;
        let mut ended = 0;
        for r in futures::future::join_all(recorders).await {
            let outcome = r.unwrap().unwrap();
            released += outcome.released.iter().filter(|t| t.envelope.node.as_deref() == Some("join")).count();
            assert!(outcome.released.iter().all(|t| t.envelope.parents.len() == 40), "round {round}");
            ended += outcome.runs_ended.len();
        }
        assert_eq!(released, 1, "round {round}: the join was released {released} times");
        assert_eq!(ended, 0, "the run waits for its join");
        let join = inserted.tasks["join"];
        let out = s
            .store
            .record_events(&[event(
                &TaskEnvelope { id: join, ..TaskEnvelope::new("collect", serde_json::Value::Null) },
                EventKind::Succeeded,
                1,
            )])
            .await
            .unwrap();
        assert_eq!(out.runs_ended, vec![(spec.id, RunState::Succeeded)], "round {round}");
    }
}

/// A loop iteration that spawns is decided by its join: when the join's result does not
/// pass the loop's predicate, the loop goes on to its next iteration. A waiting task cannot be
/// cancelled on its own.
#[tokio::test]
async fn a_spawning_loop_iteration_loops_on_its_joins_result() {
    let s = Schema::new("store_loop_spawn").await;
    let spec = RunSpec::new(vec![NodeSpec::new("refine", "plan", serde_json::Value::Null).repeat_until("q >= 1", 3)]);
    let planned = plan_nodes(&spec.nodes, "default", Priority::Normal, 1 << 20).unwrap();
    let inserted = s.store.insert_run(&spec, &planned, None).await.unwrap();
    let first = inserted.ready[0].envelope.clone();

    let mut spawned = event(&first, EventKind::Spawned, 1);
    spawned.spawn = Some(Box::new(Spawn {
        children: vec![NodeSpec::new("", "search", serde_json::json!(1))],
        join: NodeSpec::new("", "collect", serde_json::Value::Null),
        on_child_failure: OnFailure::Fail,
    }));
    let out = s.store.record_events(&[spawned]).await.unwrap();
    assert_eq!(out.released.len(), 1, "the child");
    let child = out.released[0].envelope.clone();
    assert!(!s.store.cancel(first.id).await.unwrap().cancelled, "a waiting task is not cancelled alone");

    let out = s.store.record_events(&[event(&child, EventKind::Succeeded, 1)]).await.unwrap();
    let join = out.released[0].envelope.clone();
    assert_eq!(join.node.as_deref(), Some("join"));
    let mut joined = event(&join, EventKind::Succeeded, 1);
    joined.result = Some(serde_json::json!({"q": 0}));
    let out = s.store.record_events(&[joined]).await.unwrap();
    let next: Vec<_> = out.released.iter().map(|t| (t.envelope.node.clone(), t.envelope.iteration)).collect();
    assert_eq!(next, vec![(Some("refine".to_string()), 2)], "the loop goes on");
    assert!(out.runs_ended.is_empty());
    assert_eq!(
        out.released[0].envelope.previous.as_ref().and_then(|p| p.result.clone()),
        Some(serde_json::json!({"q": 0}))
    );

    let second = out.released[0].envelope.clone();
    let mut done = event(&second, EventKind::Succeeded, 1);
    done.result = Some(serde_json::json!({"q": 2}));
    let out = s.store.record_events(&[done]).await.unwrap();
    assert_eq!(out.runs_ended, vec![(spec.id, RunState::Succeeded)]);
}

/// What the aggregator reads: an ended run's summary in one query (the same totals `run.get`
/// gives), and the runs running and created per name, all of them, in grouped queries.
#[tokio::test]
async fn run_end_summary_and_counts_per_name() {
    let s = Schema::new("store_run_counts").await;
    let mut ids = Vec::new();
    for name in ["research", "research", "quorum"] {
        let mut spec = RunSpec::new(vec![NodeSpec::new("only", "echo", serde_json::json!(1))]);
        spec.name = Some(name.into());
        let planned = plan_nodes(&spec.nodes, "default", Priority::Normal, 1 << 20).unwrap();
        let inserted = s.store.insert_run(&spec, &planned, None).await.unwrap();
        ids.push((spec.id, inserted.ready[0].envelope.clone()));
    }
    let mut running = s.store.running_runs_by_name().await.unwrap();
    running.sort();
    assert_eq!(running, vec![(Some("quorum".to_string()), 1), (Some("research".to_string()), 2)]);
    let created = s.store.runs_created_by_name(0, 5_000).await.unwrap();
    assert_eq!(created.iter().map(|(_, _, n)| n).sum::<u64>(), 3);
    assert!(created.iter().all(|(_, b, _)| b % 5_000 == 0 && *b > 0));
    let future = taskfleet_proto::now_ms() + 60_000;
    assert!(s.store.runs_created_by_name(future, 5_000).await.unwrap().is_empty());

    let (run, task) = &ids[0];
    let out = s.store.record_events(&[event(task, EventKind::Succeeded, 1)]).await.unwrap();
    assert_eq!(out.runs_ended, vec![(*run, RunState::Succeeded)]);
    let summary = s.store.run_end_summary(*run).await.unwrap().expect("the run");
    let view = s.store.run_view(&taskfleet_proto::RunGetRequest { id: *run, tasks: Some(0) }).await.unwrap().unwrap();
    assert_eq!(
        (summary.name.as_deref(), summary.state, summary.created_at, summary.finished_at),
        (Some("research"), RunState::Succeeded, view.created_at, view.finished_at)
    );
    assert_eq!(summary.totals, view.totals);
    assert_eq!((summary.totals.tasks, summary.totals.attempts), (1, 1));
    assert!(s.store.run_end_summary(uuid::Uuid::now_v7()).await.unwrap().is_none());
    let running = s.store.running_runs_by_name().await.unwrap();
    assert!(running.contains(&(Some("research".to_string()), 1)), "{running:?}");
}
