//! NATS JetStream for taskfleet: connecting (with a server version check), declaring the
//! streams and durable consumers every component relies on, and publishing many messages with
//! their acknowledgements awaited together, submitting tasks, and decoding fleet messages.
//!
//! Only the coordinator declares streams and consumers ([`Topology::ensure_streams`], the
//! `*_consumer` methods); workers and the aggregator bind to them by name (`bind_*`), so their
//! NATS users need no right to create anything ([`taskfleet_proto::Permissions`]).
//!
//! Topology (names from [`taskfleet_proto::Subjects`]):
//!
//! | stream | subjects | retention | consumers |
//! |---|---|---|---|
//! | `<P>_SUBMIT` | `<p>.submit.>` | work queue, dedup window | `coordinator` |
//! | `<P>_DISPATCH` | `<p>.dispatch.>` | work queue | `dispatch-<queue>-<priority>`, shared by workers |
//! | `<P>_EVENTS` | `<p>.events.<queue>.<priority>` | limits (max age) | `coordinator-<priority>` (one per lane), `aggregator` |
//! | `KV_<P>_CANCELLED` | bucket | history 1, max age | none: workers read it by message (no watch) |
//! | `<P>_DEAD` | `<p>.dead.>` | limits (long max age) | none: an archive of dead tasks |

mod consume;
mod error;
mod publish;
mod submit;
mod topology;

pub use consume::{IDLE_TICK, consume_batches, hand_back};
pub use error::{BusError, BusErrorKind};
pub use publish::{Outgoing, publish_all};
pub use submit::{
    RunSubmitError, SentSubmission, SubmitError, decode_message, publish_submission, send_submission, submit_run,
};
pub use topology::{
    COORDINATOR_CONSUMER, ConsumerProgress, StreamState, Topology, connect, connect_options, server_addrs,
};
