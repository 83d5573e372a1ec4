//! Drawing a run as text: a header, then one line per task, parents first, spawned tasks under
//! their spawner, loop iterations under the iteration they complete, long spawns collapsed.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, HashSet};
use taskfleet_proto::{RunState, RunTaskView, RunView, TaskState};
use uuid::Uuid;

/// Siblings with the same spawner beyond which `draw` collapses them.
const COLLAPSE_OVER: usize = 20;
/// Siblings shown before the collapsed ones.
const COLLAPSE_HEAD: usize = 10;
/// Siblings shown after the collapsed ones.
const COLLAPSE_TAIL: usize = 5;
/// Deepest indentation drawn, in levels; a long loop chain or deep spawn stays on screen.
const MAX_INDENT: usize = 16;
/// Parents named on a line at most; the rest are counted.
const MAX_PARENTS_NAMED: usize = 5;
/// Longest output or error text in the header, in characters.
const MAX_HEADER_TEXT: usize = 200;
/// Widest tree column padded to; longer names push their line's other columns right.
const MAX_TREE_WIDTH: usize = 48;

/// The run drawn as text: a header (id, name, state, elapsed time, totals, output or error),
/// then one line per task, parents before dependents, spawned tasks indented under their
/// spawner and loop iterations under the iteration they complete. A run still running is
/// timed against the clock; everything else comes from `view`.
pub fn draw(view: &RunView) -> String {
    draw_at(view, taskfleet_proto::now_ms())
}

/// [`draw`], with `now_ms` (Unix epoch milliseconds) as the time a running run is timed to.
fn draw_at(view: &RunView, now_ms: u64) -> String {
    let mut out = header(view, now_ms, true);
    let lines = layout(view);
    out.push_str(&render(view, &lines));
    let total = view.totals.tasks.max(view.tasks.len() as u64);
    if (view.tasks.len() as u64) < total {
        out.push_str(&format!(
            "… {} of {total} tasks listed (oldest first; --tasks N lists more, up to 5000)\n",
            view.tasks.len()
        ));
    }
    out
}

/// The header: a state line, then the output or error line, if any (`with_output`: the
/// output too, else only the error).
pub(super) fn header(view: &RunView, now_ms: u64, with_output: bool) -> String {
    let t = &view.totals;
    let (elapsed, word) = match view.finished_at {
        Some(end) => (end.saturating_sub(view.created_at), "after"),
        None => (now_ms.saturating_sub(view.created_at), "for"),
    };
    let name = view.name.as_deref().map(|n| format!(" {:?}", one_line(n, 80))).unwrap_or_default();
    let mut out = format!(
        "{} run {}{name}  {} {word} {}  ·  {} {}  ·  {} {}  ·  {}+{} tokens  ·  ${:.4}\n",
        run_marker(view.state),
        view.id,
        view.state.as_str(),
        duration(elapsed),
        t.tasks,
        plural(t.tasks, "task"),
        t.attempts,
        plural(t.attempts, "attempt"),
        t.prompt_tokens,
        t.completion_tokens,
        t.cost_usd,
    );
    if let Some(e) = &view.error {
        out.push_str(&format!("error: {}: {}\n", one_line(&e.code, 64), one_line(&e.message, MAX_HEADER_TEXT)));
    } else if let Some(output) = view.output.as_ref().filter(|_| with_output) {
        out.push_str(&format!("output: {}\n", one_line(&output.to_string(), MAX_HEADER_TEXT)));
    }
    out
}

/// One line of the drawing.
#[derive(Debug, PartialEq)]
enum Line {
    /// A task (its index in the view) at a depth.
    Task { task: usize, depth: usize },
    /// Collapsed siblings at a depth: how many, their states, and the tasks under them.
    More { depth: usize, count: usize, states: BTreeMap<&'static str, usize>, nested: usize },
}

/// The task the line of task `i` is drawn under: the task it completes (a loop iteration's
/// predecessor, a join's spawner), else its spawner, when listed.
fn holder(view: &RunView, index: &HashMap<Uuid, usize>, i: usize) -> Option<usize> {
    let t = &view.tasks[i];
    [t.completes, t.spawned_by].into_iter().flatten().filter_map(|id| index.get(&id).copied()).find(|&h| h != i)
}

/// Orders a group of siblings parents first (edges within the group), earliest listed first
/// among the ready ones; tasks on a cycle (malformed data) come last, in listed order.
fn topological(view: &RunView, index: &HashMap<Uuid, usize>, group: &[usize]) -> Vec<usize> {
    let members: HashSet<usize> = group.iter().copied().collect();
    let mut waiting: HashMap<usize, usize> = HashMap::with_capacity(group.len());
    let mut dependents: HashMap<usize, Vec<usize>> = HashMap::new();
    for &i in group {
        let mut parents: Vec<usize> = view.tasks[i]
            .depends_on
            .iter()
            .filter_map(|p| index.get(p).copied())
            .filter(|p| members.contains(p))
            .collect();
        parents.sort_unstable();
        parents.dedup();
        waiting.insert(i, parents.len());
        for p in parents {
            dependents.entry(p).or_default().push(i);
        }
    }
    let mut ready: BinaryHeap<Reverse<usize>> = group.iter().filter(|i| waiting[i] == 0).map(|&i| Reverse(i)).collect();
    let mut out = Vec::with_capacity(group.len());
    while let Some(Reverse(i)) = ready.pop() {
        out.push(i);
        for &d in dependents.get(&i).into_iter().flatten() {
            if let Some(w) = waiting.get_mut(&d) {
                *w -= 1;
                if *w == 0 {
                    ready.push(Reverse(d));
                }
            }
        }
    }
    if out.len() < group.len() {
        let placed: HashSet<usize> = out.iter().copied().collect();
        out.extend(group.iter().copied().filter(|i| !placed.contains(i)));
    }
    out
}

/// Work of the layout walk.
enum Step {
    /// Draw this task and then what is under it.
    Task(usize, usize),
    /// Collapse these siblings at this depth.
    Hidden(Vec<usize>, usize),
}

/// The drawing's lines in order: a depth-first walk from the tasks drawn under none, each
/// group of siblings in topological order, long runs of siblings with one spawner collapsed.
fn layout(view: &RunView) -> Vec<Line> {
    let index: HashMap<Uuid, usize> = view.tasks.iter().enumerate().map(|(i, t)| (t.id, i)).collect();
    let mut under: HashMap<Option<usize>, Vec<usize>> = HashMap::new();
    for i in 0..view.tasks.len() {
        under.entry(holder(view, &index, i)).or_default().push(i);
    }
    let steps_under = |at: Option<usize>, depth: usize| -> Vec<Step> {
        let group = under.get(&at).map(|g| topological(view, &index, g)).unwrap_or_default();
        collapse(view, group, depth)
    };
    let mut visited = vec![false; view.tasks.len()];
    let mut lines = Vec::with_capacity(view.tasks.len().min(1024));
    let mut stack: Vec<Step> = steps_under(None, 0).into_iter().rev().collect();
    // Tasks unreachable from the top (their holders form a cycle) are drawn at the top after.
    let mut orphans = 0..view.tasks.len();
    loop {
        let Some(step) = stack.pop() else {
            match orphans.find(|&i| !visited[i]) {
                Some(i) => {
                    stack.push(Step::Task(i, 0));
                    continue;
                }
                None => break,
            }
        };
        match step {
            Step::Task(i, depth) => {
                if std::mem::replace(&mut visited[i], true) {
                    continue;
                }
                lines.push(Line::Task { task: i, depth });
                stack.extend(steps_under(Some(i), depth + 1).into_iter().rev());
            }
            Step::Hidden(hidden, depth) => {
                let mut states = BTreeMap::new();
                for &i in &hidden {
                    *states.entry(view.tasks[i].state.as_str()).or_insert(0) += 1;
                }
                // Everything under the hidden siblings is hidden with them.
                let mut nested = 0;
                let mut todo = hidden.clone();
                while let Some(i) = todo.pop() {
                    if std::mem::replace(&mut visited[i], true) {
                        continue;
                    }
                    if let Some(g) = under.get(&Some(i)) {
                        nested += g.iter().filter(|&&c| !visited[c]).count();
                        todo.extend(g.iter().copied());
                    }
                }
                lines.push(Line::More { depth, count: hidden.len(), states, nested });
            }
        }
    }
    lines
}

/// Turns ordered siblings into steps, collapsing each stretch of more than
/// [`COLLAPSE_OVER`] consecutive siblings with the same spawner to its first
/// [`COLLAPSE_HEAD`], a count, and its last [`COLLAPSE_TAIL`].
fn collapse(view: &RunView, group: Vec<usize>, depth: usize) -> Vec<Step> {
    let mut steps = Vec::new();
    let mut start = 0;
    while start < group.len() {
        let spawner = view.tasks[group[start]].spawned_by;
        let end =
            group[start..].iter().position(|&i| view.tasks[i].spawned_by != spawner).map_or(group.len(), |n| start + n);
        let stretch = &group[start..end];
        if spawner.is_some() && stretch.len() > COLLAPSE_OVER {
            let tail = stretch.len() - COLLAPSE_TAIL;
            steps.extend(stretch[..COLLAPSE_HEAD].iter().map(|&i| Step::Task(i, depth)));
            steps.push(Step::Hidden(stretch[COLLAPSE_HEAD..tail].to_vec(), depth));
            steps.extend(stretch[tail..].iter().map(|&i| Step::Task(i, depth)));
        } else {
            steps.extend(stretch.iter().map(|&i| Step::Task(i, depth)));
        }
        start = end;
    }
    steps
}

/// Draws the lines in aligned columns: tree (marker and name), kind, state, attempts,
/// iteration, duration, tokens, cost, then parents and error unpadded.
fn render(view: &RunView, lines: &[Line]) -> String {
    let names: HashMap<Uuid, String> = view.tasks.iter().map(|t| (t.id, label(t))).collect();
    let mut rows: Vec<Option<[String; 9]>> = Vec::with_capacity(lines.len());
    let mut more: Vec<String> = Vec::new();
    let mut above: Option<Uuid> = None;
    for line in lines {
        match line {
            Line::Task { task, depth } => {
                let t = &view.tasks[*task];
                rows.push(Some(cells(t, *depth, above, &names)));
                above = Some(t.id);
            }
            Line::More { depth, count, states, nested } => {
                let mut states: Vec<(&str, usize)> = states.iter().map(|(s, n)| (*s, *n)).collect();
                states.sort_by_key(|&(s, n)| (Reverse(n), s));
                let states: Vec<String> = states.iter().map(|(s, n)| format!("{s} {n}")).collect();
                let nested = if *nested > 0 { format!(", {nested} under them") } else { String::new() };
                more.push(format!("{}… {count} more (states: {}){nested}", indent(*depth), states.join(", ")));
                rows.push(None);
                above = None;
            }
        }
    }
    // Padded columns: tree, kind, state, attempts, iteration, duration, tokens, cost.
    const PADDED: usize = 8;
    const RIGHT: [bool; PADDED] = [false, false, false, false, false, true, true, true];
    let mut widths = [0usize; PADDED];
    // A column with nothing but `-` on every line takes no room.
    let mut empty = [true; PADDED];
    for row in rows.iter().flatten() {
        for ((w, e), cell) in widths.iter_mut().zip(empty.iter_mut()).zip(row.iter()) {
            *w = (*w).max(cell.chars().count());
            *e &= cell.is_empty() || cell == "-";
        }
    }
    widths[0] = widths[0].min(MAX_TREE_WIDTH);
    let mut more = more.into_iter();
    let mut out = String::new();
    for row in &rows {
        let Some(row) = row else {
            out.push_str(&more.next().unwrap_or_default());
            out.push('\n');
            continue;
        };
        let mut parts: Vec<String> = Vec::with_capacity(row.len());
        for (c, cell) in row.iter().enumerate() {
            if c < PADDED {
                if empty[c] {
                    continue;
                }
                let w = widths[c];
                parts.push(if RIGHT[c] { format!("{cell:>w$}") } else { format!("{cell:<w$}") });
            } else if !cell.is_empty() {
                parts.push(cell.clone());
            }
        }
        out.push_str(parts.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// The cells of a task's line; `above` is the task on the line above, if any.
fn cells(t: &RunTaskView, depth: usize, above: Option<Uuid>, names: &HashMap<Uuid, String>) -> [String; 9] {
    let parents = if t.depends_on.len() > 1 || (t.depends_on.len() == 1 && above != Some(t.depends_on[0])) {
        let named: Vec<String> = t
            .depends_on
            .iter()
            .take(MAX_PARENTS_NAMED)
            .map(|p| names.get(p).cloned().unwrap_or_else(|| short(p)))
            .collect();
        let rest = t.depends_on.len().saturating_sub(MAX_PARENTS_NAMED);
        let rest = if rest > 0 { format!(" +{rest} more") } else { String::new() };
        format!("← {}{rest}", named.join(", "))
    } else {
        String::new()
    };
    let error = match &t.error {
        Some(e) if t.state != TaskState::Succeeded => format!("[{}]", one_line(&e.code, 64)),
        _ => String::new(),
    };
    let tokens = t.prompt_tokens + t.completion_tokens;
    [
        format!("{}{} {}", indent(depth), task_marker(t.state), label(t)),
        t.kind.clone(),
        t.state.as_str().to_string(),
        format!("{} {}", t.attempts, plural(u64::from(t.attempts), "attempt")),
        if t.iteration > 0 { format!("iter {}", t.iteration) } else { String::new() },
        t.duration_ms.map(duration).unwrap_or_else(|| "-".into()),
        if tokens > 0 { format!("{}+{} tok", t.prompt_tokens, t.completion_tokens) } else { "-".into() },
        if t.cost_usd > 0.0 { format!("${:.4}", t.cost_usd) } else { "-".into() },
        [parents, error].into_iter().filter(|s| !s.is_empty()).collect::<Vec<_>>().join("  "),
    ]
}

/// Indentation of a depth, capped at [`MAX_INDENT`] levels.
fn indent(depth: usize) -> String {
    "  ".repeat(depth.min(MAX_INDENT))
}

/// A task's name on a line: its node name, else its short id.
fn label(t: &RunTaskView) -> String {
    t.node.as_deref().filter(|n| !n.is_empty()).map(|n| one_line(n, 64)).unwrap_or_else(|| short(&t.id))
}

/// The last 8 hex digits of an id: random in a UUIDv7, whose first ones are its timestamp.
fn short(id: &Uuid) -> String {
    let hex = id.simple().to_string();
    hex[hex.len() - 8..].to_string()
}

/// The marker of a task state.
fn task_marker(state: TaskState) -> char {
    match state {
        TaskState::Succeeded => '✓',
        TaskState::Failed | TaskState::Dead => '✗',
        TaskState::Cancelled => '⊘',
        TaskState::Running => '▶',
        TaskState::Pending | TaskState::Queued | TaskState::Waiting | TaskState::Retrying => '…',
    }
}

/// The marker of a run state.
fn run_marker(state: RunState) -> char {
    match state {
        RunState::Succeeded => '✓',
        RunState::Failed => '✗',
        RunState::Cancelled => '⊘',
        RunState::Running => '▶',
    }
}

/// `word` or `words`.
fn plural(n: u64, word: &str) -> String {
    if n == 1 { word.to_string() } else { format!("{word}s") }
}

/// A duration in milliseconds, short: `850ms`, `12.3s`, `4m05s`, `2h03m`.
fn duration(ms: u64) -> String {
    match ms {
        0..1_000 => format!("{ms}ms"),
        1_000..60_000 => format!("{:.1}s", ms as f64 / 1000.0),
        60_000..3_600_000 => format!("{}m{:02}s", ms / 60_000, ms / 1000 % 60),
        _ => format!("{}h{:02}m", ms / 3_600_000, ms / 60_000 % 60),
    }
}

/// Text made safe for one terminal line: control characters become spaces, and text over
/// `max` characters is cut with `…`.
fn one_line(s: &str, max: usize) -> String {
    let mut out: String = s.chars().take(max).map(|c| if c.is_control() { ' ' } else { c }).collect();
    if s.chars().nth(max).is_some() {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use taskfleet_proto::{RunTotals, TaskErrorInfo};

    /// Run creation time of the examples.
    const T0: u64 = 1_763_900_000_000;

    fn id(n: u128) -> Uuid {
        Uuid::from_u128(0x0190_0000_0000_7000_8000_0000_0000_0000 | n)
    }

    fn task(n: u128, node: &str, kind: &str, state: TaskState) -> RunTaskView {
        RunTaskView {
            id: id(n),
            node: Some(node.into()),
            kind: kind.into(),
            state,
            attempts: u32::from(state != TaskState::Pending),
            iteration: 0,
            depends_on: Vec::new(),
            spawned_by: None,
            completes: None,
            duration_ms: state.is_final().then_some(1_200),
            started_at: None,
            finished_at: None,
            prompt_tokens: 0,
            completion_tokens: 0,
            cost_usd: 0.0,
            error: None,
        }
    }

    fn after(mut t: RunTaskView, parents: &[u128]) -> RunTaskView {
        t.depends_on = parents.iter().map(|&p| id(p)).collect();
        t
    }

    fn view(state: RunState, tasks: Vec<RunTaskView>) -> RunView {
        let mut totals = RunTotals { tasks: tasks.len() as u64, ..Default::default() };
        for t in &tasks {
            *totals.states.entry(t.state.as_str().to_string()).or_insert(0) += 1;
            totals.attempts += u64::from(t.attempts);
            totals.prompt_tokens += t.prompt_tokens;
            totals.completion_tokens += t.completion_tokens;
            totals.cost_usd += t.cost_usd;
        }
        RunView {
            id: id(0xabc),
            name: Some("nightly-report".into()),
            state,
            created_at: T0,
            finished_at: state.is_final().then_some(T0 + 12_345),
            deadline: None,
            output: None,
            error: None,
            totals,
            tasks,
        }
    }

    #[test]
    fn draws_a_diamond_parents_first() {
        let mut write = after(task(4, "write", "llm.chat", TaskState::Succeeded), &[2, 3]);
        (write.prompt_tokens, write.completion_tokens, write.cost_usd) = (1200, 340, 0.0123);
        write.attempts = 2;
        // Listed out of order: the drawing still puts parents first.
        let tasks = vec![
            task(1, "plan", "llm.chat", TaskState::Succeeded),
            write,
            after(task(3, "news", "search", TaskState::Succeeded), &[1]),
            after(task(2, "papers", "search", TaskState::Succeeded), &[1]),
        ];
        let mut v = view(RunState::Succeeded, tasks);
        v.output = Some(json!({"write": {"words": 800}}));
        let drawn = draw(&v);
        println!("{drawn}");
        assert_eq!(
            drawn,
            "✓ run 01900000-0000-7000-8000-000000000abc \"nightly-report\"  succeeded after 12.3s  ·  4 tasks  ·  \
             5 attempts  ·  1200+340 tokens  ·  $0.0123\n\
             output: {\"write\":{\"words\":800}}\n\
             ✓ plan    llm.chat  succeeded  1 attempt   1.2s             -        -\n\
             ✓ news    search    succeeded  1 attempt   1.2s             -        -\n\
             ✓ papers  search    succeeded  1 attempt   1.2s             -        -  ← plan\n\
             ✓ write   llm.chat  succeeded  2 attempts  1.2s  1200+340 tok  $0.0123  ← papers, news\n"
        );
    }

    #[test]
    fn a_spawn_of_thirty_children_collapses_under_its_spawner() {
        let mut tasks = vec![task(1, "fanout", "split", TaskState::Succeeded)];
        for c in 0..30u128 {
            let state = if c == 17 { TaskState::Dead } else { TaskState::Succeeded };
            let mut child = task(10 + c, &c.to_string(), "fetch", state);
            child.spawned_by = Some(id(1));
            tasks.push(child);
        }
        let mut join = after(task(100, "join", "merge", TaskState::Succeeded), &(10..40).collect::<Vec<_>>());
        join.spawned_by = Some(id(1));
        join.completes = Some(id(1));
        tasks.push(join);
        tasks.push(after(task(101, "report", "llm.chat", TaskState::Running), &[1]));
        let v = view(RunState::Running, tasks);
        let drawn = draw_at(&v, T0 + 65_000);
        println!("{drawn}");
        let lines: Vec<&str> = drawn.lines().collect();
        assert!(
            lines[0].starts_with("▶ run 01900000-0000-7000-8000-000000000abc \"nightly-report\"  running for 1m05s")
        );
        assert!(lines[0].contains("33 tasks  ·  33 attempts  ·  0+0 tokens  ·  $0.0000"), "{}", lines[0]);
        // Header, fanout, the first 10 of the 31 tasks it spawned, the collapsed line, the last
        // 5 (4 children and the join, which comes last: it depends on every child), report.
        assert_eq!(lines.len(), 1 + 1 + 10 + 1 + 5 + 1, "{drawn}");
        assert!(lines[1].starts_with("✓ fanout  split"));
        assert!(lines[2].starts_with("  ✓ 0 ") && lines[11].starts_with("  ✓ 9 "), "{drawn}");
        assert_eq!(lines[12], "  … 16 more (states: succeeded 15, dead 1)");
        assert!(lines[13].starts_with("  ✓ 26 ") && lines[16].starts_with("  ✓ 29 "), "{drawn}");
        // Columns with nothing to show (tokens, cost) take no room.
        assert_eq!(lines[17], "  ✓ join  merge     succeeded  1 attempt  1.2s  ← 0, 1, 2, 3, 4 +25 more");
        // Its parent is not the line above.
        assert!(lines[18].starts_with("▶ report  llm.chat  running") && lines[18].ends_with("← fanout"), "{drawn}");
    }

    #[test]
    fn ten_thousand_children_stay_readable() {
        let mut tasks = vec![task(1, "fanout", "split", TaskState::Waiting)];
        for c in 0..10_000u128 {
            let state = if c % 5_000 == 4_321 { TaskState::Failed } else { TaskState::Succeeded };
            let mut child = task(10 + c, &c.to_string(), "fetch", state);
            child.spawned_by = Some(id(1));
            tasks.push(child);
        }
        let drawn = draw_at(&view(RunState::Running, tasks), T0);
        assert_eq!(drawn.lines().count(), 1 + 1 + 10 + 1 + 5, "{drawn}");
        assert!(drawn.contains("\n  ✓ 9  "), "{drawn}");
        assert!(drawn.contains("\n  … 9985 more (states: succeeded 9983, failed 2)\n  ✓ 9995  "), "{drawn}");
    }

    #[test]
    fn loop_iterations_nest_under_the_iteration_they_complete() {
        let mut iterations = Vec::new();
        for n in 1..=3u32 {
            let state = if n == 3 { TaskState::Running } else { TaskState::Waiting };
            let mut it = after(task(10 + u128::from(n), "draft", "llm.chat", state), &[1]);
            it.iteration = n;
            if n > 1 {
                it.completes = Some(id(10 + u128::from(n) - 1));
            }
            iterations.push(it);
        }
        let mut publish = after(task(20, "publish", "http", TaskState::Pending), &[11]);
        publish.error = Some(TaskErrorInfo { code: "breaker_open".into(), message: "m".into(), retryable: true });
        let mut tasks = vec![task(1, "research", "search", TaskState::Succeeded), publish];
        tasks.extend(iterations);
        let mut v = view(RunState::Running, tasks);
        // Listed out of order: publish after the iterations.
        v.tasks.swap(1, 4);
        let drawn = draw_at(&v, T0 + 800);
        println!("{drawn}");
        let lines: Vec<&str> = drawn.lines().collect();
        assert!(lines[0].contains("running for 800ms"), "{drawn}");
        assert_eq!(
            &lines[1..],
            [
                "✓ research   search    succeeded  1 attempt           1.2s",
                "… draft      llm.chat  waiting    1 attempt   iter 1     -",
                "  … draft    llm.chat  waiting    1 attempt   iter 2     -  ← research",
                "    ▶ draft  llm.chat  running    1 attempt   iter 3     -  ← research",
                "… publish    http      pending    0 attempts             -  ← draft  [breaker_open]",
            ]
        );
    }

    #[test]
    fn unlisted_tasks_are_counted_and_missing_holders_tolerated() {
        let mut child = task(2, "0", "fetch", TaskState::Queued);
        child.spawned_by = Some(id(99));
        let mut v = view(RunState::Failed, vec![child]);
        v.totals.tasks = 3;
        v.error = Some(TaskErrorInfo { code: "run_timeout".into(), message: "too\nslow".into(), retryable: false });
        let drawn = draw(&v);
        let lines: Vec<&str> = drawn.lines().collect();
        assert_eq!(lines[1], "error: run_timeout: too slow");
        assert!(lines[2].starts_with("… 0  fetch  queued"), "{drawn}");
        assert_eq!(lines[3], "… 1 of 3 tasks listed (oldest first; --tasks N lists more, up to 5000)");
    }

    #[test]
    fn durations_are_short() {
        assert_eq!(duration(850), "850ms");
        assert_eq!(duration(12_345), "12.3s");
        assert_eq!(duration(245_000), "4m05s");
        assert_eq!(duration(7_380_000), "2h03m");
    }
}
