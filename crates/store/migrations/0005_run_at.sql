-- When a task waiting in Postgres is dispatched again: set for `retrying` tasks (the handler
-- failed and asked for another attempt after a backoff) and for `queued` tasks a worker
-- deferred (a rate limit or breaker further away than a worker holds tasks). Any coordinator
-- promotes due rows (`FOR UPDATE SKIP LOCKED`), publishing the next dispatch generation.
ALTER TABLE tasks ADD COLUMN run_at timestamptz;
CREATE INDEX tasks_run_at ON tasks (run_at) WHERE run_at IS NOT NULL;
-- The W3C trace context the next dispatch of a waiting retry or deferral carries, so that all
-- attempts of a task stay in one trace.
ALTER TABLE tasks ADD COLUMN next_traceparent text;
