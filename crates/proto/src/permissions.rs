//! Who may publish and subscribe to what: the NATS permissions of each role of a fleet, and the
//! `authorization` block of a nats-server configuration that grants them.
//!
//! Every role gets only the subjects its code uses. Two JetStream rules shape the table:
//! creating a consumer lets its creator read a stream whatever its subscribe permissions say,
//! and a pull request (`$JS.API.CONSUMER.MSG.NEXT`) delivers to whatever reply subject it names.
//! So only the coordinator (and an admin) may create streams and consumers; workers and the
//! aggregator bind to consumers the coordinator made, by name, and read the cancellation bucket
//! with direct message reads instead of a watch (which would create a consumer).

use crate::Subjects;
use std::fmt::Write;

/// A role in the fleet, with its own NATS user.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// Submits tasks and runs and waits for their commit notices; nothing else.
    Client,
    /// Owns the streams, consumers and bucket, and answers the task API.
    Coordinator,
    /// Pulls its dispatch consumers, publishes events, reads cancellations and status.
    Worker,
    /// Reads its own event consumer, publishes alerts and live figures.
    Aggregator,
    /// Operators and the `taskfleet` CLI: everything.
    Admin,
}

impl Role {
    /// Every role, in the order the configuration lists them.
    pub const ALL: [Role; 5] = [Role::Coordinator, Role::Worker, Role::Aggregator, Role::Client, Role::Admin];

    /// The role's user name (also the suffix of its inbox prefix).
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Client => "client",
            Role::Coordinator => "coordinator",
            Role::Worker => "worker",
            Role::Aggregator => "aggregator",
            Role::Admin => "admin",
        }
    }

    /// The role named `name`.
    pub fn parse(name: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.as_str() == name)
    }

    /// The inbox prefix a service of this role uses (`_INBOX_<role>`), so no other role can
    /// read its replies. Clients also may use the default `_INBOX`, as NATS libraries do.
    pub fn inbox_prefix(self) -> String {
        format!("_INBOX_{}", self.as_str())
    }
}

/// Name of the aggregator's durable consumer on the event stream (created by the coordinator).
pub const AGGREGATOR_CONSUMER: &str = "aggregator";

/// The subjects one role may publish to and subscribe to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Permissions {
    /// Subjects (with wildcards) the role may publish to.
    pub publish: Vec<String>,
    /// Subjects (with wildcards) the role may subscribe to.
    pub subscribe: Vec<String>,
    /// Whether it may answer requests it received (publish to their reply subjects).
    pub allow_responses: bool,
}

/// The API verbs a worker calls (task gating, workflow parents and checkpoints, opening its
/// queues' consumers).
const WORKER_VERBS: [&str; 4] =
    [crate::VERB_TASK_RUNNABLE, crate::VERB_TASK_PARENTS, crate::VERB_TASK_CHECKPOINT, crate::VERB_QUEUE_OPEN];

impl Permissions {
    /// The permissions of `role` in the fleet named by `subjects`.
    pub fn of(role: Role, subjects: &Subjects) -> Permissions {
        let s = subjects;
        let p = s.prefix();
        let inbox = format!("{}.>", role.inbox_prefix());
        let kv = format!("$KV.{}.>", s.cancel_bucket());
        let list = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        match role {
            Role::Admin => Permissions { publish: list(&[">"]), subscribe: list(&[">"]), allow_responses: true },
            Role::Client => Permissions {
                publish: vec![s.submit_all(), s.api(crate::VERB_RUN_SUBMIT)],
                subscribe: vec!["_INBOX.>".into(), inbox, s.committed_all(), s.run_ended_all()],
                allow_responses: false,
            },
            Role::Coordinator => Permissions {
                publish: vec![
                    format!("{p}.>"),
                    "$JS.API.>".into(),
                    "$JS.ACK.>".into(),
                    "$JS.FC.>".into(),
                    kv,
                    // Confirmed-submit replies go to the submitters' inboxes.
                    "_INBOX.>".into(),
                    format!("{}.>", Role::Client.inbox_prefix()),
                    format!("{}.>", Role::Admin.inbox_prefix()),
                ],
                subscribe: vec![format!("{p}.>"), inbox],
                allow_responses: true,
            },
            Role::Worker => {
                let dispatch = s.dispatch_stream();
                let mut publish = vec![
                    s.events_all(),
                    s.worker_status(),
                    s.submit_all(),
                    format!("$JS.API.CONSUMER.INFO.{dispatch}.*"),
                    format!("$JS.API.CONSUMER.MSG.NEXT.{dispatch}.*"),
                    format!("$JS.ACK.{dispatch}.>"),
                    format!("$JS.API.STREAM.MSG.GET.KV_{}", s.cancel_bucket()),
                ];
                publish.extend(WORKER_VERBS.iter().map(|v| s.api(v)));
                Permissions { publish, subscribe: vec![inbox, kv, s.worker_status()], allow_responses: false }
            }
            Role::Aggregator => {
                let (events, c) = (s.events_stream(), AGGREGATOR_CONSUMER);
                Permissions {
                    publish: vec![
                        format!("$JS.API.CONSUMER.INFO.{events}.{c}"),
                        format!("$JS.API.CONSUMER.MSG.NEXT.{events}.{c}"),
                        format!("$JS.ACK.{events}.{c}.>"),
                        s.alerts(),
                        s.stats(),
                    ],
                    subscribe: vec![inbox, s.worker_status(), s.run_ended_all()],
                    allow_responses: false,
                }
            }
        }
    }
}

/// How the generated configuration states each role's password.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PasswordSource {
    /// A reference to the environment variable `<prefix><ROLE>` of the nats-server process
    /// (e.g. `NATS_PASSWORD_WORKER`), as a Kubernetes Secret provides it.
    Env(String),
    /// The given password for every role, as `(role, password)` pairs (tests, the dev fleet).
    Literal(Vec<(Role, String)>),
}

/// The nats-server `authorization { users = [...] }` block granting every role of the fleet
/// named by `subjects` its [`Permissions`].
pub fn authorization_block(subjects: &Subjects, passwords: &PasswordSource) -> String {
    let mut out = String::from("authorization {\n  users = [\n");
    for role in Role::ALL {
        let password = match passwords {
            PasswordSource::Env(prefix) => format!("${prefix}{}", role.as_str().to_uppercase()),
            PasswordSource::Literal(list) => {
                let Some((_, pw)) = list.iter().find(|(r, _)| *r == role) else { continue };
                quoted(pw)
            }
        };
        let perms = Permissions::of(role, subjects);
        let _ = writeln!(out, "    {{");
        let _ = writeln!(out, "      user: {}", quoted(role.as_str()));
        let _ = writeln!(out, "      password: {password}");
        let _ = writeln!(out, "      permissions: {{");
        let _ = writeln!(out, "        publish: {{ allow: {} }}", quoted_list(&perms.publish));
        let _ = writeln!(out, "        subscribe: {{ allow: {} }}", quoted_list(&perms.subscribe));
        if perms.allow_responses {
            let _ = writeln!(out, "        allow_responses: true");
        }
        let _ = writeln!(out, "      }}");
        let _ = writeln!(out, "    }}");
    }
    out.push_str("  ]\n}\n");
    out
}

fn quoted(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

fn quoted_list(items: &[String]) -> String {
    format!("[{}]", items.iter().map(|s| quoted(s)).collect::<Vec<_>>().join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matches(pattern: &str, subject: &str) -> bool {
        let (mut p, mut s) = (pattern.split('.'), subject.split('.'));
        loop {
            match (p.next(), s.next()) {
                (Some(">"), Some(_)) => return true,
                (Some(a), Some(b)) if a == "*" || a == b => continue,
                (None, None) => return true,
                _ => return false,
            }
        }
    }

    fn may_publish(role: Role, subject: &str) -> bool {
        Permissions::of(role, &Subjects::default()).publish.iter().any(|p| matches(p, subject))
    }

    #[test]
    fn each_role_publishes_only_what_it_needs() {
        use Role::*;
        let cases = [
            (Client, "taskfleet.submit.default", true),
            (Client, "taskfleet.api.run.submit", true),
            (Client, "taskfleet.events.default.high", false),
            (Client, "taskfleet.dispatch.default.high", false),
            (Client, "taskfleet.api.task.cancel", false),
            (Client, "$JS.API.STREAM.CREATE.X", false),
            (Worker, "taskfleet.events.default.high", true),
            (Worker, "$JS.API.CONSUMER.MSG.NEXT.TASKFLEET_DISPATCH.dispatch-default-high", true),
            (Worker, "$JS.API.CONSUMER.CREATE.TASKFLEET_DISPATCH", false),
            (Worker, "$JS.API.CONSUMER.CREATE.TASKFLEET_DISPATCH.x.taskfleet.dispatch.>", false),
            (Worker, "$JS.API.CONSUMER.CREATE.KV_TASKFLEET_CANCELLED", false),
            (Worker, "$JS.API.STREAM.CREATE.TASKFLEET_EVIL", false),
            (Worker, "$KV.TASKFLEET_CANCELLED.abc", false),
            (Worker, "taskfleet.api.task.cancel", false),
            (Worker, "taskfleet.api.task.replay", false),
            (Worker, "taskfleet.dispatch.default.high", false),
            (Aggregator, "$JS.API.CONSUMER.MSG.NEXT.TASKFLEET_EVENTS.aggregator", true),
            (Aggregator, "$JS.API.CONSUMER.MSG.NEXT.TASKFLEET_DISPATCH.dispatch-default-high", false),
            (Aggregator, "$JS.API.CONSUMER.MSG.NEXT.TASKFLEET_EVENTS.coordinator-high", false),
            (Aggregator, "taskfleet.events.default.high", false),
            (Coordinator, "$JS.API.STREAM.CREATE.TASKFLEET_SUBMIT", true),
            (Coordinator, "taskfleet.dispatch.default.high", true),
            (Coordinator, "$SYS.REQ.SERVER.PING", false),
            (Admin, "$SYS.REQ.SERVER.PING", true),
        ];
        for (role, subject, allowed) in cases {
            assert_eq!(may_publish(role, subject), allowed, "{role:?} publishing {subject}");
        }
    }

    #[test]
    fn services_read_only_their_own_inbox() {
        let s = Subjects::default();
        for role in [Role::Worker, Role::Aggregator, Role::Coordinator] {
            let subs = Permissions::of(role, &s).subscribe;
            assert!(subs.contains(&format!("_INBOX_{}.>", role.as_str())), "{role:?}: {subs:?}");
            assert!(!subs.iter().any(|p| matches(p, "_INBOX.abc") || matches(p, "_INBOX_admin.abc")), "{subs:?}");
        }
    }

    #[test]
    fn the_block_names_every_role_once() {
        let conf = authorization_block(&Subjects::default(), &PasswordSource::Env("NATS_PASSWORD_".into()));
        for role in Role::ALL {
            assert_eq!(conf.matches(&format!("user: \"{}\"", role.as_str())).count(), 1, "{conf}");
            assert!(conf.contains(&format!("password: $NATS_PASSWORD_{}", role.as_str().to_uppercase())));
        }
        let only = PasswordSource::Literal(vec![(Role::Worker, "p\"w".into())]);
        let conf = authorization_block(&Subjects::default(), &only);
        assert!(conf.contains("password: \"p\\\"w\"") && !conf.contains("coordinator"), "{conf}");
    }
}
