-- Durable task state. Postgres is the source of truth: every task has one row here, and its
-- `state` moves to exactly one final value (succeeded, failed, dead, cancelled).

CREATE TABLE tasks (
    id              uuid PRIMARY KEY,            -- UUIDv7: ordered by creation time
    queue           text        NOT NULL,
    kind            text        NOT NULL,
    priority        text        NOT NULL CHECK (priority IN ('critical', 'high', 'normal', 'low')),
    state           text        NOT NULL CHECK (state IN ('pending', 'queued', 'running', 'retrying',
                                                          'succeeded', 'failed', 'dead', 'cancelled')),
    payload         jsonb       NOT NULL,
    max_attempts    integer     NOT NULL,
    timeout_ms      bigint      NOT NULL,
    idempotency_key text,
    attempt         integer     NOT NULL DEFAULT 0,   -- highest attempt seen
    has_dependents  boolean     NOT NULL DEFAULT false,
    result          jsonb,
    error           jsonb,
    worker          text,
    created_at      timestamptz NOT NULL,
    submitted_at    timestamptz NOT NULL DEFAULT now(),
    dispatched_at   timestamptz,
    started_at      timestamptz,
    finished_at     timestamptz,
    updated_at      timestamptz NOT NULL DEFAULT now()
);

-- A resubmission with a known idempotency key finds the existing task instead of a new one.
CREATE UNIQUE INDEX tasks_idempotency_key ON tasks (idempotency_key) WHERE idempotency_key IS NOT NULL;
-- Tasks not yet final, for the rescuer and for `ls --state`; small because final rows leave it.
CREATE INDEX tasks_active ON tasks (state, updated_at)
    WHERE state IN ('pending', 'queued', 'running', 'retrying');

-- Edges of the dependency graph: task_id runs after depends_on succeeds.
CREATE TABLE task_dependencies (
    task_id    uuid NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    depends_on uuid NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    PRIMARY KEY (task_id, depends_on)
);
CREATE INDEX task_dependencies_depends_on ON task_dependencies (depends_on);

-- One row per attempt that ended (succeeded, failed, retrying, dead, cancelled). The primary
-- key makes a duplicate delivery of the same attempt a no-op.
CREATE TABLE task_attempts (
    task_id     uuid        NOT NULL,
    attempt     integer     NOT NULL,
    outcome     text        NOT NULL,
    worker      text,
    error       jsonb,
    started_at  timestamptz,
    finished_at timestamptz,
    PRIMARY KEY (task_id, attempt)
);
