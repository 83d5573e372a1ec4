//! Connecting and declaring streams and consumers.

use crate::{BusError, BusErrorKind};
use async_nats::ServerAddr;
use async_nats::jetstream::{
    self,
    consumer::{AckPolicy, DeliverPolicy, pull},
    stream::{self, DiscardPolicy, RetentionPolicy, StorageType},
};
use std::time::Duration;
use taskfleet_config::{NatsConfig, StorageKind, redact_url};
use taskfleet_proto::{AGGREGATOR_CONSUMER, Priority, Subjects};

/// The seed servers of `cfg.url` (comma-separated), parsed. Errors show the entry with its
/// credentials redacted.
pub fn server_addrs(cfg: &NatsConfig) -> Result<Vec<ServerAddr>, BusError> {
    cfg.servers()
        .into_iter()
        .map(|s| s.parse::<ServerAddr>().map_err(|e| BusError::new(BusErrorKind::Connect, redact_url(s), e)))
        .collect()
}

/// Connects to NATS through any of the seed servers of `cfg.url`, retrying for up to
/// `patience`, and checks that the server runs JetStream. Servers older than 2.10.23 are
/// accepted with a warning (production should run a newer one). Logs and errors show the
/// servers with credentials redacted.
pub async fn connect(cfg: &NatsConfig, name: &str, patience: Duration) -> Result<async_nats::Client, BusError> {
    let servers = server_addrs(cfg)?;
    let shown = cfg.redacted_url();
    let deadline = tokio::time::Instant::now() + patience;
    let mut delay = Duration::from_millis(100);
    let client = loop {
        let attempt = connect_options(cfg)
            .await?
            .name(name)
            .connection_timeout(Duration::from_secs(5))
            // Keep retrying reconnects forever once connected: a restarted nats-server must
            // not take the service down with it.
            .max_reconnects(None)
            .event_callback(|event| async move {
                match event {
                    async_nats::Event::Disconnected => tracing::warn!("disconnected from NATS"),
                    async_nats::Event::Connected => tracing::info!("connected to NATS"),
                    other => tracing::debug!(%other, "NATS connection event"),
                }
            })
            .connect(servers.clone())
            .await;
        match attempt {
            Ok(client) => break client,
            Err(e) if tokio::time::Instant::now() + delay < deadline => {
                tracing::warn!(servers = %shown, error = %e, "NATS not reachable yet, retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
            Err(e) => {
                return Err(BusError::new(BusErrorKind::Connect, shown, e));
            }
        }
    };
    let info = client.server_info();
    tracing::info!(servers = %shown, server = %info.server_name, version = %info.version, "NATS connection up");
    let shown = format!("{} (one of {shown})", info.server_name);
    if !info.jetstream {
        let why = format!("JetStream is not enabled on nats-server {} (start it with -js)", info.version);
        return Err(BusError::new(BusErrorKind::Unsuitable, shown, why));
    }
    let version = parse_version(&info.version);
    if version < (2, 9, 0) {
        let why =
            format!("nats-server {} is too old: taskfleet needs 2.9 or later (2.10.23+ recommended)", info.version);
        return Err(BusError::new(BusErrorKind::Unsuitable, shown, why));
    }
    if version < (2, 10, 23) {
        tracing::warn!(
            version = %info.version,
            "nats-server older than 2.10.23: fine for development, but production should run 2.10.23 or later"
        );
    }
    Ok(client)
}

/// The credentials, TLS settings and inbox prefix of `cfg` as client options (what
/// [`connect`] starts from; for a program that sets the rest itself).
pub async fn connect_options(cfg: &NatsConfig) -> Result<async_nats::ConnectOptions, BusError> {
    let fail = |what: &str, e: &dyn std::fmt::Display| BusError::new(BusErrorKind::Connect, what, e.to_string());
    let mut opts = if !cfg.creds_file.is_empty() {
        async_nats::ConnectOptions::with_credentials_file(&cfg.creds_file)
            .await
            .map_err(|e| fail(&format!("creds file {}", cfg.creds_file), &e))?
    } else if !cfg.nkey_file.is_empty() {
        let seed =
            std::fs::read_to_string(&cfg.nkey_file).map_err(|e| fail(&format!("nkey file {}", cfg.nkey_file), &e))?;
        async_nats::ConnectOptions::with_nkey(seed.trim().to_string())
    } else if !cfg.user.is_empty() {
        let password = cfg.effective_password().map_err(|e| fail("nats.password", &e))?.unwrap_or_default();
        async_nats::ConnectOptions::with_user_and_password(cfg.user.clone(), password)
    } else if let Some((user, password)) = url_credentials(cfg)? {
        // The client ignores credentials in server URLs; the documented `user:password@` and
        // `token@` forms work through these options.
        match password {
            Some(password) => async_nats::ConnectOptions::with_user_and_password(user, password),
            None => async_nats::ConnectOptions::with_token(user),
        }
    } else {
        async_nats::ConnectOptions::new()
    };
    if !cfg.tls_ca_file.is_empty() {
        opts = opts.add_root_certificates(cfg.tls_ca_file.clone().into()).require_tls(true);
    }
    if !cfg.tls_cert_file.is_empty() {
        opts = opts.add_client_certificate(cfg.tls_cert_file.clone().into(), cfg.tls_key_file.clone().into());
    }
    Ok(opts.custom_inbox_prefix(cfg.effective_inbox_prefix()))
}

/// The first `user:password@` (or `token@`) found in the seed servers of `cfg.url`,
/// percent-decoded (a `,` or `@` in a password is written `%2C`, `%40`).
fn url_credentials(cfg: &NatsConfig) -> Result<Option<(String, Option<String>)>, BusError> {
    let decode = |s: &str| percent_encoding::percent_decode_str(s).decode_utf8_lossy().into_owned();
    Ok(server_addrs(cfg)?.iter().find_map(|a| {
        let user = decode(a.username()?);
        Some((user, a.password().map(decode)))
    }))
}

fn parse_version(v: &str) -> (u32, u32, u32) {
    let mut parts = v.trim_start_matches('v').split(|c: char| !c.is_ascii_digit()).map(|p| p.parse().unwrap_or(0));
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0), parts.next().unwrap_or(0))
}

/// The fleet's streams and consumers, declared idempotently by whichever component starts.
#[derive(Debug, Clone)]
pub struct Topology {
    /// JetStream context.
    pub js: jetstream::Context,
    /// Subject and stream names.
    pub subjects: Subjects,
    cfg: NatsConfig,
}

/// Name of the coordinator's durable consumers (on the submit and event streams).
pub const COORDINATOR_CONSUMER: &str = "coordinator";

impl Topology {
    /// A topology on `client` for the fleet described by `cfg`.
    pub fn new(client: async_nats::Client, cfg: &NatsConfig) -> Self {
        let js =
            jetstream::ContextBuilder::new().timeout(Duration::from_secs(10)).max_ack_inflight(10_000).build(client);
        Topology { js, subjects: Subjects::new(&cfg.subject_prefix, &cfg.stream_prefix), cfg: cfg.clone() }
    }

    /// Creates the streams (submit, dispatch, dead letters, events), or updates them to this
    /// configuration.
    pub async fn ensure_streams(&self) -> Result<(), BusError> {
        let s = &self.subjects;
        // Work queues refuse new messages when full (a submitter or the coordinator gets an
        // error and retries: backpressure, nothing lost); the event and dead-letter logs drop
        // their oldest messages (the coordinator records events long before, and an alert
        // fires when its backlog ages; see the coordinator's stream watch).
        let streams = [
            self.stream(s.submit_stream(), s.submit_all(), RetentionPolicy::WorkQueue, None, DiscardPolicy::New),
            self.stream(s.dispatch_stream(), s.dispatch_all(), RetentionPolicy::WorkQueue, None, DiscardPolicy::New),
            self.stream(
                s.dead_stream(),
                s.dead_all(),
                RetentionPolicy::Limits,
                Some(self.cfg.dead_max_age),
                DiscardPolicy::Old,
            ),
            self.stream(
                s.events_stream(),
                s.events_all(),
                RetentionPolicy::Limits,
                Some(self.cfg.events_max_age),
                DiscardPolicy::Old,
            ),
        ];
        for config in streams {
            let name = config.name.clone();
            self.js
                .create_or_update_stream(config)
                .await
                .map_err(|e| BusError::new(BusErrorKind::Topology, format!("stream {name}"), e))?;
        }
        Ok(())
    }

    fn storage(&self) -> StorageType {
        match self.cfg.storage {
            StorageKind::File => StorageType::File,
            StorageKind::Memory => StorageType::Memory,
        }
    }

    /// A stream of this fleet's storage and replicas. The dedup window is capped by the max age
    /// (JetStream refuses a longer one).
    fn stream(
        &self,
        name: String,
        subject: String,
        retention: RetentionPolicy,
        max_age: Option<Duration>,
        discard: DiscardPolicy,
    ) -> stream::Config {
        let max_age = max_age.unwrap_or_default();
        let duplicate_window =
            if max_age.is_zero() { self.cfg.dedup_window } else { self.cfg.dedup_window.min(max_age) };
        stream::Config {
            name,
            subjects: vec![subject],
            retention,
            max_age,
            max_bytes: self.cfg.stream_max_bytes as i64,
            discard,
            duplicate_window,
            storage: self.storage(),
            num_replicas: self.cfg.replicas,
            ..Default::default()
        }
    }

    /// The bucket of cancelled task ids: the coordinator writes, every worker watches.
    pub async fn cancel_bucket(&self) -> Result<jetstream::kv::Store, BusError> {
        let config = jetstream::kv::Config {
            bucket: self.subjects.cancel_bucket(),
            history: 1,
            max_age: self.cfg.cancel_max_age,
            max_bytes: (self.cfg.stream_max_bytes / 16) as i64,
            storage: self.storage(),
            num_replicas: self.cfg.replicas,
            ..Default::default()
        };
        self.js
            .create_or_update_key_value(config)
            .await
            .map_err(|e| BusError::new(BusErrorKind::Topology, format!("bucket {}", self.subjects.cancel_bucket()), e))
    }

    /// The stream behind the cancellation bucket, for reading it without creating anything
    /// (what a worker may do; see [`taskfleet_proto::Permissions`]).
    pub async fn cancel_stream(&self) -> Result<jetstream::stream::Stream<()>, BusError> {
        let name = format!("KV_{}", self.subjects.cancel_bucket());
        self.js
            .get_stream_no_info(&name)
            .await
            .map_err(|e| BusError::new(BusErrorKind::Topology, format!("stream {name}"), e))
    }

    /// Binds to the existing dispatch consumer of `queue` at `priority` (made by the
    /// coordinator on `queue.open`), without creating or changing it.
    pub async fn bind_dispatch_consumer(
        &self,
        queue: &str,
        priority: Priority,
    ) -> Result<jetstream::consumer::PullConsumer, BusError> {
        self.bind(&self.subjects.dispatch_stream(), &self.subjects.dispatch_consumer(queue, priority)).await
    }

    /// Binds to the aggregator's existing event consumer (made by the coordinator at start).
    pub async fn bind_aggregator_consumer(&self) -> Result<jetstream::consumer::PullConsumer, BusError> {
        self.bind(&self.subjects.events_stream(), AGGREGATOR_CONSUMER).await
    }

    /// Creates (or updates) the aggregator's event consumer: every event, unlimited deliveries.
    pub async fn aggregator_consumer(&self) -> Result<jetstream::consumer::PullConsumer, BusError> {
        self.events_consumer(AGGREGATOR_CONSUMER, self.subjects.events_all(), 8192).await
    }

    async fn bind(&self, stream: &str, name: &str) -> Result<jetstream::consumer::PullConsumer, BusError> {
        let what = || format!("consumer {name} on {stream}");
        let stream =
            self.js.get_stream_no_info(stream).await.map_err(|e| BusError::new(BusErrorKind::Topology, what(), e))?;
        stream.get_consumer(name).await.map_err(|e| BusError::new(BusErrorKind::Topology, what(), e))
    }

    /// What a consumer has done so far: see [`ConsumerProgress`].
    pub async fn consumer_progress(&self, stream: &str, consumer: &str) -> Result<ConsumerProgress, BusError> {
        let what = || format!("consumer {consumer} on {stream}");
        let stream =
            self.js.get_stream_no_info(stream).await.map_err(|e| BusError::new(BusErrorKind::Topology, what(), e))?;
        let info =
            stream.consumer_info(consumer).await.map_err(|e| BusError::new(BusErrorKind::Topology, what(), e))?;
        let floor_idle = info.ack_floor.last_active.map(|t| {
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
            (now.as_nanos() as i128 - t.unix_timestamp_nanos()).max(0) as u64
        });
        Ok(ConsumerProgress {
            pending: info.num_pending,
            ack_pending: info.num_ack_pending,
            ack_floor: info.ack_floor.stream_sequence,
            floor_idle: floor_idle.map(Duration::from_nanos),
        })
    }

    /// Where a stream stands: its last sequence and how full it is.
    pub async fn stream_state(&self, stream: &str) -> Result<StreamState, BusError> {
        let what = || format!("stream {stream}");
        let mut s = self.js.get_stream(stream).await.map_err(|e| BusError::new(BusErrorKind::Topology, what(), e))?;
        let info = s.info().await.map_err(|e| BusError::new(BusErrorKind::Topology, what(), e))?;
        Ok(StreamState {
            last_seq: info.state.last_sequence,
            bytes: info.state.bytes,
            max_bytes: info.config.max_bytes,
        })
    }

    /// The coordinator's consumer of submissions. `max_deliver` is unlimited on purpose: while
    /// Postgres is down the coordinator hands submissions back, and none may be dropped.
    pub async fn submit_consumer(&self, max_ack_pending: i64) -> Result<jetstream::consumer::PullConsumer, BusError> {
        self.durable(
            &self.subjects.submit_stream(),
            COORDINATOR_CONSUMER,
            self.subjects.submit_all(),
            -1,
            max_ack_pending,
        )
        .await
    }

    /// A durable consumer of the task events matching `filter` (e.g.
    /// [`Subjects::events_all`]), for one reader. Unlimited deliveries, like submissions: an
    /// event that cannot be recorded yet is retried.
    pub async fn events_consumer(
        &self,
        name: &str,
        filter: String,
        max_ack_pending: i64,
    ) -> Result<jetstream::consumer::PullConsumer, BusError> {
        self.durable(&self.subjects.events_stream(), name, filter, -1, max_ack_pending).await
    }

    /// Name of the coordinator's event consumer for one priority lane.
    pub fn coordinator_events_consumer(priority: Priority) -> String {
        format!("{COORDINATOR_CONSUMER}-{}", priority.as_str())
    }

    /// The consumer that every worker of `queue` shares for `priority`.
    pub async fn dispatch_consumer(
        &self,
        queue: &str,
        priority: Priority,
    ) -> Result<jetstream::consumer::PullConsumer, BusError> {
        self.durable(
            &self.subjects.dispatch_stream(),
            &self.subjects.dispatch_consumer(queue, priority),
            self.subjects.dispatch(queue, priority),
            self.cfg.max_deliver,
            self.cfg.max_ack_pending,
        )
        .await
    }

    async fn durable(
        &self,
        stream: &str,
        name: &str,
        filter: String,
        max_deliver: i64,
        max_ack_pending: i64,
    ) -> Result<jetstream::consumer::PullConsumer, BusError> {
        let what = || format!("consumer {name} on {stream}");
        let config = pull::Config {
            durable_name: Some(name.to_string()),
            filter_subject: filter,
            ack_policy: AckPolicy::Explicit,
            deliver_policy: DeliverPolicy::All,
            ack_wait: self.cfg.ack_wait,
            max_deliver,
            max_ack_pending,
            // Large pulls of small messages: allow many waiting pull requests.
            max_waiting: 512,
            ..Default::default()
        };
        let stream =
            self.js.get_stream_no_info(stream).await.map_err(|e| BusError::new(BusErrorKind::Topology, what(), e))?;
        match stream.create_consumer(config.clone()).await {
            Ok(c) => Ok(c),
            // An existing consumer of another configuration: update it (the error of the
            // update is the one that tells why neither worked).
            Err(create_err) => {
                tracing::debug!(consumer = name, error = %create_err, "cannot create the consumer, updating it");
                stream.update_consumer(config).await.map_err(|e| BusError::new(BusErrorKind::Topology, what(), e))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{parse_version, server_addrs, url_credentials};
    use taskfleet_config::NatsConfig;

    #[test]
    fn url_credentials_are_percent_decoded() {
        let cfg =
            NatsConfig { url: "nats://h1:4222,nats://w%40rker:p%2Cw%3Ad@h2:4222".into(), ..NatsConfig::default() };
        assert_eq!(url_credentials(&cfg).unwrap(), Some(("w@rker".into(), Some("p,w:d".into()))));
    }

    #[test]
    fn every_seed_server_is_parsed_and_errors_are_redacted() {
        let cfg = NatsConfig { url: "nats://a:4222, tls://u:pw@b:4223 ,c:4224".into(), ..NatsConfig::default() };
        let addrs = server_addrs(&cfg).unwrap();
        let hosts: Vec<_> = addrs.iter().map(|a| (a.host().to_string(), a.port(), a.tls_required())).collect();
        assert_eq!(hosts, [("a".into(), 4222, false), ("b".into(), 4223, true), ("c".into(), 4224, false)]);
        let bad = NatsConfig { url: "nats://a:4222,nats://u:hunter2@b:99999".into(), ..NatsConfig::default() };
        let e = server_addrs(&bad).unwrap_err().to_string();
        assert!(e.starts_with("cannot connect to NATS at nats://u:***@b:99999: "), "{e}");
        assert!(!e.contains("hunter2"), "{e}");
    }

    #[test]
    fn versions() {
        assert_eq!(parse_version("2.9.10"), (2, 9, 10));
        assert_eq!(parse_version("v2.15.1-beta"), (2, 15, 1));
        assert!(parse_version("2.10.22") < (2, 10, 23));
        assert_eq!(parse_version("garbage"), (0, 0, 0));
    }
}

/// A stream's position and size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamState {
    /// Sequence of the last message stored.
    pub last_seq: u64,
    /// Bytes stored.
    pub bytes: u64,
    /// The stream's `max_bytes` (-1: unlimited).
    pub max_bytes: i64,
}

/// A consumer's position: messages not yet delivered, delivered and not yet acknowledged, and
/// the stream sequence up to which every message of the consumer is acknowledged (or
/// terminated).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConsumerProgress {
    /// Messages waiting for their first delivery.
    pub pending: u64,
    /// Messages delivered and not acknowledged yet.
    pub ack_pending: usize,
    /// Every message of the consumer up to this stream sequence is settled.
    pub ack_floor: u64,
    /// How long ago the floor last moved, when the server says.
    pub floor_idle: Option<Duration>,
}

impl ConsumerProgress {
    /// True when the consumer holds nothing at all.
    pub fn is_idle(&self) -> bool {
        self.pending == 0 && self.ack_pending == 0
    }
}
