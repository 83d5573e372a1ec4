-- Envelope options that shape how a task runs but are not columns of their own: the task's
-- retry backoff and the rate limits it names (`{"retry": {...}, "limits": [...]}`), kept so that
-- a task dispatched again from Postgres (dependency release, rescue, replay) keeps them.
ALTER TABLE tasks ADD COLUMN options jsonb;

-- What an attempt consumed, when there is anything to say: `{"cache_hit": true,
-- "prompt_tokens": n, "completion_tokens": n, "cost_usd": x, "saved_usd": x}` (keys present
-- only when known). Cost and cache-hit reports read it.
ALTER TABLE task_attempts ADD COLUMN usage jsonb;
