//! Workflows: runs (a DAG of named nodes submitted as one unit), the parents' outcomes a step
//! receives, spawns (children and a join added by a running step) and loops.

use crate::{
    DecodeError, PROTOCOL_VERSION, Priority, RetryBackoff, TaskEnvelope, TaskErrorInfo, TaskId, TaskState,
    validate_name,
};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::HashMap;
use uuid::Uuid;

/// What a dependent does when a parent did not succeed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnFailure {
    /// The dependent is cancelled (`dependency_failed`), and so are its own dependents.
    #[default]
    Fail,
    /// The dependent runs once every parent is final, with the failure among its parents.
    Continue,
}

impl OnFailure {
    /// Lowercase name, as stored.
    pub fn as_str(self) -> &'static str {
        match self {
            OnFailure::Fail => "fail",
            OnFailure::Continue => "continue",
        }
    }
}

/// One parent of a node: a node name, or a name with its failure policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Dependency {
    /// `"research"`: the parent's failure cancels this node.
    Node(String),
    /// `{"node": "research", "on_failure": "continue"}`.
    Edge {
        /// The parent node's name.
        node: String,
        /// What a failure of the parent does to this node.
        #[serde(default)]
        on_failure: OnFailure,
    },
}

impl Dependency {
    /// The parent node's name.
    pub fn node(&self) -> &str {
        match self {
            Dependency::Node(n) | Dependency::Edge { node: n, .. } => n,
        }
    }

    /// The parent's failure policy.
    pub fn on_failure(&self) -> OnFailure {
        match self {
            Dependency::Node(_) => OnFailure::Fail,
            Dependency::Edge { on_failure, .. } => *on_failure,
        }
    }
}

/// Repeats a node until a predicate on its output holds or `max_iterations` ran. Each
/// iteration is a task of its own (own attempts, own result) that sees the previous
/// iteration's outcome; the node's dependents see the last iteration's result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoopSpec {
    /// `<field> <op> <value>` on the output, e.g. `quality >= 0.8`, `verdict == "pass"`,
    /// `done == true`; `<field>` is a dotted path into the output object.
    pub until: String,
    /// Iterations at most (1..=[`MAX_LOOP_ITERATIONS`]). The last one's result is the node's,
    /// whether or not the predicate held.
    pub max_iterations: u32,
}

/// Most iterations a loop may name.
pub const MAX_LOOP_ITERATIONS: u32 = 1_000;

/// One step of a run or a spawn.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSpec {
    /// Name, unique in its run or spawn (1..=128 of `[A-Za-z0-9_.-]`). Optional for spawned
    /// children, which are then named by their index (`"0"`, `"1"`, …).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    /// Handler name.
    pub kind: String,
    /// Handler input.
    #[serde(default, deserialize_with = "crate::payload::deserialize")]
    pub payload: Value,
    /// Parents, by name, in the order the step receives their outcomes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub depends_on: Vec<Dependency>,
    /// Queue; the run's when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<String>,
    /// Priority; the run's when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<Priority>,
    /// Attempts per task (per iteration of a loop); 0 leaves it to the coordinator.
    #[serde(default)]
    pub max_attempts: u32,
    /// Per-attempt timeout, milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// Backoff between attempts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetryBackoff>,
    /// Fleet-wide rate limits the step takes a token from.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub limits: Vec<String>,
    /// Repeat the step until its output passes.
    #[serde(default, rename = "loop", skip_serializing_if = "Option::is_none")]
    pub repeat: Option<LoopSpec>,
}

impl NodeSpec {
    /// A node named `name` running `kind` on `payload`.
    pub fn new(name: impl Into<String>, kind: impl Into<String>, payload: Value) -> NodeSpec {
        NodeSpec {
            name: name.into(),
            kind: kind.into(),
            payload,
            depends_on: Vec::new(),
            queue: None,
            priority: None,
            max_attempts: 0,
            timeout_ms: None,
            retry: None,
            limits: Vec::new(),
            repeat: None,
        }
    }

    /// Adds parents that cancel this node when they fail.
    pub fn after(mut self, parents: &[&str]) -> NodeSpec {
        self.depends_on.extend(parents.iter().map(|p| Dependency::Node(p.to_string())));
        self
    }

    /// Adds a parent after which this node runs even when it fails.
    pub fn after_even_if_failed(mut self, parent: &str) -> NodeSpec {
        self.depends_on.push(Dependency::Edge { node: parent.to_string(), on_failure: OnFailure::Continue });
        self
    }

    /// Repeats the node until `until` holds on its output, at most `max_iterations` times.
    pub fn repeat_until(mut self, until: impl Into<String>, max_iterations: u32) -> NodeSpec {
        self.repeat = Some(LoopSpec { until: until.into(), max_iterations });
        self
    }
}

/// A run: tasks submitted as one unit, inserted in one transaction (`run.submit`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunSpec {
    /// Wire format version.
    #[serde(default = "version")]
    pub v: u16,
    /// Run id (UUIDv7); a resubmission of the same id creates nothing new.
    #[serde(default = "Uuid::now_v7")]
    pub id: Uuid,
    /// Free-form name, shown by `taskfleet run show`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Default queue of the nodes.
    #[serde(default = "default_queue")]
    pub queue: String,
    /// Default priority of the nodes.
    #[serde(default)]
    pub priority: Priority,
    /// Time the whole run may take, milliseconds; past it the run fails with `run_timeout` and
    /// its unfinished tasks are cancelled. None: no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// The steps, in any order.
    pub nodes: Vec<NodeSpec>,
}

fn version() -> u16 {
    PROTOCOL_VERSION
}

fn default_queue() -> String {
    crate::DEFAULT_QUEUE.to_string()
}

impl RunSpec {
    /// A run of `nodes` in the default queue.
    pub fn new(nodes: Vec<NodeSpec>) -> RunSpec {
        RunSpec {
            v: PROTOCOL_VERSION,
            id: Uuid::now_v7(),
            name: None,
            queue: default_queue(),
            priority: Priority::Normal,
            timeout_ms: None,
            nodes,
        }
    }
}

/// Children and the join that receives their outcomes, added by a running step
/// (`TaskContext::spawn` in the Rust worker; the `spawn` field of a `spawned` event on the
/// wire). The spawning task waits (`waiting`, holding no worker) until the join is final,
/// then takes the join's state and result as its own.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Spawn {
    /// The children; they may depend on each other by name.
    pub children: Vec<NodeSpec>,
    /// The join: runs once every child is final, with every child among its parents (in the
    /// order of `children`, after its own `depends_on` among the children, if any).
    pub join: NodeSpec,
    /// What a failed child does to the join: `fail` cancels it (and so fails the spawning
    /// task), `continue` runs it with the failures among its parents.
    #[serde(default)]
    pub on_child_failure: OnFailure,
}

/// The outcome of a final parent, as a step receives it (`parents` of the dispatched
/// envelope, in `depends_on` order).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ParentOutcome {
    /// The parent task.
    pub id: TaskId,
    /// Its node name, when it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Its final state.
    pub state: TaskState,
    /// Its result, when it succeeded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    /// Its error, when it did not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<TaskErrorInfo>,
}

impl ParentOutcome {
    /// Bytes the outcome takes encoded as JSON (a little more than as MessagePack): what
    /// budgets of outcomes travelling in one message count.
    pub fn encoded_len(&self) -> usize {
        serde_json::to_vec(self).map_or(0, |v| v.len())
    }
}

/// A comparison of a loop predicate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Ge,
    Gt,
    Le,
    Lt,
    Eq,
    Ne,
}

/// A parsed `until` predicate.
#[derive(Debug, Clone, PartialEq)]
pub struct Predicate {
    path: Vec<String>,
    op: Op,
    value: Value,
}

impl Predicate {
    /// Parses `<field> <op> <json value>`, with `op` one of `>= > <= < == !=`.
    pub fn parse(s: &str) -> Result<Predicate, String> {
        const OPS: [(&str, Op); 6] =
            [(">=", Op::Ge), ("<=", Op::Le), ("==", Op::Eq), ("!=", Op::Ne), (">", Op::Gt), ("<", Op::Lt)];
        let (at, text, op) = OPS
            .iter()
            .filter_map(|(text, op)| s.find(text).map(|at| (at, *text, *op)))
            .min_by_key(|(at, text, _)| (*at, std::cmp::Reverse(text.len())))
            .ok_or_else(|| format!("{s:?} has no comparison (one of >= > <= < == !=)"))?;
        let field = s[..at].trim();
        let literal = s[at + text.len()..].trim();
        if field.is_empty() || field.split('.').any(|p| p.is_empty() || p.contains(char::is_whitespace)) {
            return Err(format!("{s:?}: the left side must be a dotted field path"));
        }
        let value: Value = serde_json::from_str(literal).map_err(|_| {
            format!("{s:?}: the right side must be a JSON value (a number, \"text\", true, false, null)")
        })?;
        if matches!(op, Op::Ge | Op::Gt | Op::Le | Op::Lt) && !value.is_number() {
            return Err(format!("{s:?}: {text} compares numbers"));
        }
        Ok(Predicate { path: field.split('.').map(str::to_string).collect(), op, value })
    }

    /// True when the output satisfies the predicate; a missing field never does.
    pub fn holds(&self, output: &Value) -> bool {
        let mut at = output;
        for key in &self.path {
            at = match at {
                Value::Object(m) => match m.get(key) {
                    Some(v) => v,
                    None => return false,
                },
                Value::Array(a) => match key.parse::<usize>().ok().and_then(|i| a.get(i)) {
                    Some(v) => v,
                    None => return false,
                },
                _ => return false,
            };
        }
        match self.op {
            Op::Eq => at == &self.value,
            Op::Ne => at != &self.value,
            _ => {
                let (Some(a), Some(b)) = (at.as_f64(), self.value.as_f64()) else { return false };
                match self.op {
                    Op::Ge => a >= b,
                    Op::Gt => a > b,
                    Op::Le => a <= b,
                    _ => a < b,
                }
            }
        }
    }
}

impl LoopSpec {
    /// Checks the predicate and the bound.
    pub fn validate(&self) -> Result<Predicate, String> {
        if self.max_iterations == 0 || self.max_iterations > MAX_LOOP_ITERATIONS {
            return Err(format!("max_iterations {} is outside 1..={MAX_LOOP_ITERATIONS}", self.max_iterations));
        }
        Predicate::parse(&self.until)
    }

    /// Whether iteration `iteration` (from 1), which gave `output`, is the last one.
    pub fn done(&self, iteration: u32, output: &Value) -> bool {
        iteration >= self.max_iterations || Predicate::parse(&self.until).is_ok_and(|p| p.holds(output))
    }
}

/// A node turned into its task: the envelope, and per parent (same order as the envelope's
/// `depends_on`) its failure policy.
#[derive(Debug, Clone, PartialEq)]
pub struct PlannedTask {
    /// The node's name.
    pub node: String,
    /// The task as it will be stored.
    pub envelope: TaskEnvelope,
    /// Failure policy of each parent edge.
    pub on_failure: Vec<OnFailure>,
    /// The node's loop, if it repeats.
    pub repeat: Option<LoopSpec>,
}

/// Checks a set of nodes (a run's or a spawn's children plus join) and turns them into tasks
/// in an order where every parent comes before its dependents. Errors name the node and field.
pub fn plan_nodes(
    nodes: &[NodeSpec],
    queue: &str,
    priority: Priority,
    max_payload_bytes: usize,
) -> Result<Vec<PlannedTask>, DecodeError> {
    let invalid = |field: &'static str, reason: String| DecodeError::Invalid { field, reason };
    let mut index: HashMap<&str, usize> = HashMap::with_capacity(nodes.len());
    for (i, n) in nodes.iter().enumerate() {
        validate_name("nodes.name", &n.name, true)?;
        if index.insert(n.name.as_str(), i).is_some() {
            return Err(invalid("nodes.name", format!("two nodes are named {:?}", n.name)));
        }
    }
    let ids: Vec<Uuid> = nodes.iter().map(|_| Uuid::now_v7()).collect();
    let mut planned: Vec<Option<PlannedTask>> = vec![None; nodes.len()];
    for (i, n) in nodes.iter().enumerate() {
        let mut env = TaskEnvelope::new(n.kind.clone(), n.payload.clone());
        env.id = ids[i];
        env.queue = n.queue.clone().unwrap_or_else(|| queue.to_string());
        env.priority = n.priority.unwrap_or(priority);
        env.max_attempts = n.max_attempts;
        env.timeout_ms = n.timeout_ms.unwrap_or(crate::DEFAULT_TIMEOUT_MS);
        env.retry = n.retry;
        env.limits = n.limits.clone();
        env.node = Some(n.name.clone());
        let mut on_failure = Vec::with_capacity(n.depends_on.len());
        for d in &n.depends_on {
            let Some(&p) = index.get(d.node()) else {
                return Err(invalid(
                    "nodes.depends_on",
                    format!("node {:?} depends on unknown node {:?}", n.name, d.node()),
                ));
            };
            if env.depends_on.contains(&ids[p]) {
                return Err(invalid("nodes.depends_on", format!("node {:?} names {:?} twice", n.name, d.node())));
            }
            env.depends_on.push(ids[p]);
            on_failure.push(d.on_failure());
        }
        if let Some(l) = &n.repeat {
            l.validate().map_err(|e| invalid("nodes.loop", format!("node {:?}: {e}", n.name)))?;
            env.iteration = 1;
        }
        // Edges are checked above and for cycles below: a join may have as many parents as its
        // spawn has children, beyond what a single submitted task may name.
        env.validate_task(max_payload_bytes).map_err(|e| match e {
            DecodeError::Invalid { field, reason } => invalid(field, format!("node {:?}: {reason}", n.name)),
            other => other,
        })?;
        planned[i] = Some(PlannedTask { node: n.name.clone(), envelope: env, on_failure, repeat: n.repeat.clone() });
    }
    topological_order(nodes, &index, planned)
}

/// Orders planned tasks parents first (Kahn's algorithm, stable in submission order); a cycle
/// is an error naming a node on it.
fn topological_order(
    nodes: &[NodeSpec],
    index: &HashMap<&str, usize>,
    mut planned: Vec<Option<PlannedTask>>,
) -> Result<Vec<PlannedTask>, DecodeError> {
    let mut waiting: Vec<usize> = nodes.iter().map(|n| n.depends_on.len()).collect();
    let mut children: Vec<Vec<usize>> = vec![Vec::new(); nodes.len()];
    for (i, n) in nodes.iter().enumerate() {
        for d in &n.depends_on {
            children[index[d.node()]].push(i);
        }
    }
    let mut ready: std::collections::VecDeque<usize> = (0..nodes.len()).filter(|&i| waiting[i] == 0).collect();
    let mut out = Vec::with_capacity(nodes.len());
    while let Some(i) = ready.pop_front() {
        out.extend(planned[i].take());
        for &c in &children[i] {
            waiting[c] -= 1;
            if waiting[c] == 0 {
                ready.push_back(c);
            }
        }
    }
    if out.len() < nodes.len() {
        let stuck = (0..nodes.len()).find(|&i| waiting[i] > 0).map(|i| nodes[i].name.clone()).unwrap_or_default();
        return Err(DecodeError::Invalid {
            field: "nodes.depends_on",
            reason: format!("node {stuck:?} is on a cycle"),
        });
    }
    Ok(out)
}

impl Spawn {
    /// The children and the join as one node list: unnamed children are named by index, and
    /// the join depends on every child (with `on_child_failure`) after its own parents.
    pub fn nodes(&self) -> Result<Vec<NodeSpec>, DecodeError> {
        let mut nodes: Vec<NodeSpec> = self.children.clone();
        for (i, c) in nodes.iter_mut().enumerate() {
            if c.name.is_empty() {
                c.name = i.to_string();
            }
        }
        let mut join = self.join.clone();
        if join.name.is_empty() {
            join.name = "join".into();
        }
        if nodes.iter().any(|c| c.name == join.name) {
            return Err(DecodeError::Invalid {
                field: "spawn.join",
                reason: format!("a child is named {:?}", join.name),
            });
        }
        for c in &nodes {
            if !join.depends_on.iter().any(|d| d.node() == c.name) {
                join.depends_on.push(Dependency::Edge { node: c.name.clone(), on_failure: self.on_child_failure });
            }
        }
        nodes.push(join);
        Ok(nodes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn predicates_compare_a_field_of_the_output() {
        let p = Predicate::parse("quality >= 0.8").unwrap();
        assert!(p.holds(&json!({"quality": 0.8})));
        assert!(!p.holds(&json!({"quality": 0.79})));
        assert!(!p.holds(&json!({"other": 1})));
        assert!(Predicate::parse("review.verdict == \"pass\"").unwrap().holds(&json!({"review": {"verdict": "pass"}})));
        assert!(Predicate::parse("done != false").unwrap().holds(&json!({"done": true})));
        assert!(Predicate::parse("scores.0 < 3").unwrap().holds(&json!({"scores": [2]})));
        for bad in ["quality", ">= 1", "q >= \"x\"", "q == nonsense", "a..b == 1"] {
            assert!(Predicate::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_loop_ends_when_its_predicate_holds_or_its_iterations_run_out() {
        let l = LoopSpec { until: "score > 0.9".into(), max_iterations: 3 };
        assert!(!l.done(1, &json!({"score": 0.5})));
        assert!(l.done(2, &json!({"score": 0.95})));
        assert!(l.done(3, &json!({"score": 0.1})));
        assert!(LoopSpec { until: "x > 1".into(), max_iterations: 0 }.validate().is_err());
    }

    #[test]
    fn plans_come_parents_first_with_their_edges() {
        let nodes = vec![
            NodeSpec::new("write", "llm", json!({})).after(&["a", "b"]),
            NodeSpec::new("a", "search", json!({"q": 1})),
            NodeSpec::new("b", "search", json!({"q": 2})).after_even_if_failed("a"),
        ];
        let plan = plan_nodes(&nodes, "default", Priority::High, 1 << 20).unwrap();
        let order: Vec<&str> = plan.iter().map(|p| p.node.as_str()).collect();
        assert_eq!(order, ["a", "b", "write"]);
        assert_eq!(plan[1].on_failure, [OnFailure::Continue]);
        assert_eq!(plan[2].envelope.depends_on, [plan[0].envelope.id, plan[1].envelope.id]);
        assert_eq!(plan[2].envelope.priority, Priority::High);
    }

    #[test]
    fn bad_graphs_are_refused_with_the_node_named() {
        let cycle =
            vec![NodeSpec::new("a", "k", json!(1)).after(&["b"]), NodeSpec::new("b", "k", json!(1)).after(&["a"])];
        let err = plan_nodes(&cycle, "default", Priority::Normal, 1 << 20).unwrap_err().to_string();
        assert!(err.contains("cycle"), "{err}");
        let unknown = vec![NodeSpec::new("a", "k", json!(1)).after(&["nope"])];
        assert!(plan_nodes(&unknown, "default", Priority::Normal, 1 << 20).unwrap_err().to_string().contains("nope"));
        let twice = vec![NodeSpec::new("a", "k", json!(1)), NodeSpec::new("a", "k", json!(1))];
        assert!(plan_nodes(&twice, "default", Priority::Normal, 1 << 20).is_err());
    }

    #[test]
    fn a_spawn_joins_every_child() {
        let s = Spawn {
            children: vec![NodeSpec::new("", "search", json!(1)), NodeSpec::new("", "search", json!(2))],
            join: NodeSpec::new("", "merge", json!(null)),
            on_child_failure: OnFailure::Continue,
        };
        let nodes = s.nodes().unwrap();
        assert_eq!(nodes.iter().map(|n| n.name.as_str()).collect::<Vec<_>>(), ["0", "1", "join"]);
        assert_eq!(nodes[2].depends_on.len(), 2);
        assert!(nodes[2].depends_on.iter().all(|d| d.on_failure() == OnFailure::Continue));
        let spec: RunSpec = serde_json::from_value(json!({"nodes": [
            {"name": "a", "kind": "k"},
            {"name": "b", "kind": "k", "depends_on": ["a", {"node": "a", "on_failure": "continue"}],
             "loop": {"until": "x > 1", "max_iterations": 2}}
        ]}))
        .unwrap();
        assert_eq!(spec.nodes[1].depends_on[1].on_failure(), OnFailure::Continue);
    }
}
