-- Workflows. A run is a set of tasks submitted as one unit; a running task may add children
-- and a join (a spawn) or its loop's next iteration, and then waits (`waiting`, holding no
-- worker) until that task is final and takes its outcome.

ALTER TABLE tasks DROP CONSTRAINT tasks_state_check;
ALTER TABLE tasks ADD CONSTRAINT tasks_state_check
    CHECK (state IN ('pending', 'queued', 'running', 'retrying', 'waiting',
                     'succeeded', 'failed', 'dead', 'cancelled'));

CREATE TABLE runs (
    id          uuid PRIMARY KEY,
    name        text,
    state       text        NOT NULL CHECK (state IN ('running', 'succeeded', 'failed', 'cancelled')),
    -- Tasks of the run not final yet: decremented in the transaction that makes each final,
    -- so the run ends exactly once, when it reaches zero.
    remaining   integer     NOT NULL,
    -- Tasks the run has ever had (spawns and loop iterations add to it), for its limit.
    task_count  integer     NOT NULL,
    timeout_ms  bigint,
    deadline    timestamptz,
    output      jsonb,
    error       jsonb,
    -- W3C trace context of the run's root span: every task of the run is traced under it.
    traceparent text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz,
    updated_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX runs_deadline ON runs (deadline) WHERE state = 'running' AND deadline IS NOT NULL;

ALTER TABLE tasks
    ADD COLUMN run_id      uuid,
    ADD COLUMN node        text,
    -- Parents not final yet. A dependent moves on in the transaction that takes this to zero,
    -- whichever parent ends last and however many coordinators record at once: the
    -- decrement locks the row, so exactly one transaction sees zero.
    ADD COLUMN waiting_on  integer NOT NULL DEFAULT 0,
    -- The waiting task whose outcome this one decides (a spawn's join, a loop's next iteration).
    ADD COLUMN completes   uuid,
    ADD COLUMN spawned_by  uuid,
    ADD COLUMN spawn_depth integer NOT NULL DEFAULT 0,
    -- Loop iteration from 1 (0: not a loop), and the loop (`{"until": .., "max_iterations": ..}`).
    ADD COLUMN iteration   integer NOT NULL DEFAULT 0,
    ADD COLUMN loop_spec   jsonb,
    -- The last checkpoint an attempt saved; the next attempt receives it.
    ADD COLUMN checkpoint  jsonb,
    -- Trace context a dispatch from Postgres carries (a run's root, a spawner's attempt).
    ADD COLUMN traceparent text;
CREATE INDEX tasks_run ON tasks (run_id) WHERE run_id IS NOT NULL;
CREATE INDEX tasks_completes ON tasks (completes) WHERE completes IS NOT NULL;

-- Foreign keys on edges cost a trigger per row and check what every writer already checks (a
-- parent exists, or comes earlier in the same transaction); no task row is ever deleted. A
-- 1,000 x 10 DAG's 18,000 edges took 470 ms to insert with them.
ALTER TABLE task_dependencies DROP CONSTRAINT task_dependencies_task_id_fkey,
                              DROP CONSTRAINT task_dependencies_depends_on_fkey;

-- Edge order (the order a dependent receives its parents' outcomes) and failure policy.
ALTER TABLE task_dependencies
    ADD COLUMN position   integer NOT NULL DEFAULT 0,
    ADD COLUMN on_failure text    NOT NULL DEFAULT 'fail' CHECK (on_failure IN ('fail', 'continue'));

UPDATE tasks t SET waiting_on = (SELECT count(*) FROM task_dependencies d JOIN tasks p ON p.id = d.depends_on
                                 WHERE d.task_id = t.id
                                   AND p.state NOT IN ('succeeded', 'failed', 'dead', 'cancelled'))
WHERE t.state = 'pending';
