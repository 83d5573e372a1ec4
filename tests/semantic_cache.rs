//! The semantic cache with the real binaries: two workers, the mock API's embeddings, a policy
//! on `echo` keyed by its `text`. A paraphrase of a computed text is a hit on either worker
//! (its result is the first text's echo, its attempt costs only the lookup, nothing when that
//! worker embedded the same text before); an unrelated text is a miss; with the embedding
//! provider failing, tasks still run, without the cache. A lookup slower than `ack_wait` does
//! not get its task redelivered to another worker.

use serde_json::json;
use std::time::Duration;
use taskfleet_e2e::Fleet;
use taskfleet_mock_api::{Control, EMBEDDINGS_ENDPOINT, MockApi, MockConfig, embed};
use taskfleet_proto::TaskEnvelope;

fn echo(text: &str) -> TaskEnvelope {
    TaskEnvelope::new("echo", json!({ "text": text }))
}

fn cosine(a: &str, b: &str) -> f32 {
    embed(a, 256).iter().zip(embed(b, 256)).map(|(x, y)| x * y).sum()
}

/// A task's payload, result, and its attempt's worker and usage, as Postgres has them.
type Row = (serde_json::Value, Option<serde_json::Value>, Option<String>, Option<serde_json::Value>);

/// (text of the payload, text of the result, worker, usage) of every task's last attempt.
async fn outcomes(pool: &sqlx::PgPool) -> Vec<(String, String, String, serde_json::Value)> {
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT t.payload, t.result, a.worker, a.usage FROM tasks t \
             JOIN task_attempts a ON a.task_id = t.id ORDER BY a.finished_at",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    rows.into_iter()
        .map(|(payload, result, worker, usage)| {
            let text = |v: &serde_json::Value| v["text"].as_str().unwrap_or_default().to_string();
            (
                text(&payload),
                result.as_ref().map(text).unwrap_or_default(),
                worker.unwrap_or_default(),
                usage.unwrap_or_default(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paraphrases_hit_on_either_worker_and_unrelated_texts_miss() {
    let api = MockApi::start(MockConfig { name: "emb".into(), ..MockConfig::default() }).await.unwrap();
    let original = "How do I cook fresh pasta at home?";
    let paraphrases = [
        "how to cook fresh pasta at home",
        "How do I cook fresh pasta at home",
        "how do i cook fresh pasta at home?",
        "How do I cook fresh pasta at home ?",
        "HOW DO I COOK FRESH PASTA AT HOME?",
        "how do I cook fresh pasta at home",
    ];
    let unrelated = "Quarterly revenue of semiconductor vendors";
    for p in paraphrases {
        assert!(cosine(original, p) > 0.8, "{p:?} is not a paraphrase for the mock: {}", cosine(original, p));
    }
    assert!(cosine(original, unrelated) < 0.3);

    let fleet = semantic_fleet("semantic", &api, &[]);
    let client = fleet.nats().await;
    let pool = fleet.env.pg_pool().await;

    // The first text runs its handler and fills the cache.
    fleet.submit_all(&client, &[echo(original)]).await;
    fleet.wait_final(&pool, 1, Duration::from_secs(60)).await;
    // Paraphrases, one at a time so that each lands on whichever worker pulls it: all hits.
    let mut n = 1;
    for round in 0..3 {
        for p in paraphrases {
            fleet.submit_all(&client, &[echo(p)]).await;
            n += 1;
            fleet.wait_final(&pool, n as i64, Duration::from_secs(60)).await;
        }
        if round == 0 {
            // Let each worker's index go past its sync interval at least once.
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
    }
    fleet.submit_all(&client, &[echo(unrelated)]).await;
    n += 1;
    let counts = fleet.wait_final(&pool, n as i64, Duration::from_secs(60)).await;
    assert_eq!(counts.get("succeeded"), Some(&(n as i64)), "{counts:?}");

    let all = outcomes(&pool).await;
    assert_eq!(all.len(), n);
    let (first, hits, miss) = (&all[0], &all[1..n - 1], &all[n - 1]);
    assert_eq!((first.0.as_str(), first.1.as_str()), (original, original));
    assert_ne!(first.3["cache_hit"], true);
    let mut workers = std::collections::BTreeSet::new();
    // Each worker remembers the texts it embedded: (worker, text) pairs seen so far.
    let mut embedded = std::collections::BTreeSet::from([(first.2.clone(), first.0.clone())]);
    for (text, result, worker, usage) in hits {
        assert_eq!(usage["cache_hit"], true, "{text:?} was not a hit: {usage}");
        assert_eq!(result, original, "{text:?} was answered with {result:?}");
        if embedded.insert((worker.clone(), text.clone())) {
            // A hit costs its lookup: the embedding's tokens at the embedding model's price.
            assert!(usage["cost_usd"].as_f64().is_some_and(|c| c > 0.0), "{usage}");
        } else {
            // This worker embedded the same text before: the remembered vector costs nothing.
            assert!(usage["cost_usd"].as_f64().is_none_or(|c| c == 0.0), "{text:?} paid again: {usage}");
            assert_eq!(usage["prompt_tokens"], 0, "{usage}");
        }
        workers.insert(worker.clone());
    }
    assert_eq!(workers.len(), 2, "hits on both workers: {workers:?}");
    assert_eq!((miss.0.as_str(), miss.1.as_str()), (unrelated, unrelated));
    assert_ne!(miss.3["cache_hit"], true, "{}", miss.3);
    embedded.insert((miss.2.clone(), miss.0.clone()));
    // Every worker embedded each of its texts once.
    assert_eq!(api.stats().by_endpoint[EMBEDDINGS_ENDPOINT], embedded.len() as u64);
    let hits_total = hits.len();
    println!("semantic cache: {} tasks, {hits_total} hits on {} workers, 1 unrelated miss", n, workers.len());

    // The embedding provider failing: tasks run without the cache, nothing fails. (A paraphrase
    // neither worker has embedded: a remembered one would still be looked up.)
    let fresh = "How do I cook fresh pasta at home!";
    assert!(cosine(original, fresh) > 0.8);
    api.control(&Control { error_rate: Some(1.0), ..Control::default() }).unwrap();
    fleet.submit_all(&client, &[echo(fresh), echo("Something else entirely, about trains")]).await;
    n += 2;
    let counts = fleet.wait_final(&pool, n as i64, Duration::from_secs(60)).await;
    assert_eq!(counts.get("succeeded"), Some(&(n as i64)), "{counts:?}");
    let all = outcomes(&pool).await;
    for (text, result, _, usage) in &all[n - 2..] {
        assert_eq!(text, result, "ran its own handler");
        assert_ne!(usage["cache_hit"], true);
    }
    assert!(fleet.logs().contains("embedding unavailable"), "the bypass is logged");
}

/// A semantic lookup at admission slower than `ack_wait` (an embedding provider answering in
/// 3.5 s, `ack_wait` 2 s, within `policies.semantic_lookup_timeout`): the delivery is
/// heartbeated while it is admitted, so JetStream does not hand it to the other worker, and the
/// task is looked up, run and recorded once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lookup_slower_than_ack_wait_is_not_redelivered() {
    let api = MockApi::start(MockConfig { name: "emb".into(), ..MockConfig::default() }).await.unwrap();
    api.control(&Control { latency_ms: Some(3_500), ..Control::default() }).unwrap();
    let fleet = semantic_fleet(
        "semantic_slow",
        &api,
        &[("TASKFLEET_NATS_ACK_WAIT", "2s"), ("TASKFLEET_POLICIES_SEMANTIC_LOOKUP_TIMEOUT", "10s")],
    );
    let client = fleet.nats().await;
    let pool = fleet.env.pg_pool().await;

    let task = echo("A slow provider's question");
    fleet.submit_all(&client, std::slice::from_ref(&task)).await;
    let counts = fleet.wait_final(&pool, 1, Duration::from_secs(60)).await;
    assert_eq!(counts.get("succeeded"), Some(&1), "{counts:?}");
    // Let a redelivery, had there been one, be admitted and recorded too.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(api.stats().by_endpoint[EMBEDDINGS_ENDPOINT], 1, "the task was admitted twice");
    let attempts: i64 = sqlx::query_scalar("SELECT count(*) FROM task_attempts").fetch_one(&pool).await.unwrap();
    assert_eq!(attempts, 1);
    let all = outcomes(&pool).await;
    assert_eq!(all.len(), 1);
    let (text, result, _, usage) = &all[0];
    assert_eq!((text.as_str(), result.as_str()), ("A slow provider's question", "A slow provider's question"));
    // The lookup's embedding is the attempt's cost.
    assert!(usage["cost_usd"].as_f64().is_some_and(|c| c > 0.0), "{usage}");
}

/// A coordinator and two workers whose `echo` kind has a semantic policy served by `api`'s
/// embeddings (model `emb`), with `more` settings.
fn semantic_fleet(name: &str, api: &taskfleet_mock_api::RunningMock, more: &[(&str, &str)]) -> Fleet {
    let mut fleet = Fleet::new(name);
    fleet
        .set("TASKFLEET_PROVIDERS_URLS", &format!("mock={}/v1", api.url()))
        .set("TASKFLEET_PROVIDERS_MODELS", "emb=mock")
        .set("TASKFLEET_PROVIDERS_PRICES", "emb=0.02/0")
        .set("TASKFLEET_POLICIES_SEMANTIC_CACHE", "echo=1h by text threshold 0.8 model emb")
        .set("TASKFLEET_POLICIES_BREAKER_FAILURES", "100");
    for (k, v) in more {
        fleet.set(k, v);
    }
    fleet.start_coordinator();
    fleet.start_worker(&[]);
    fleet.start_worker(&[]);
    fleet
}
