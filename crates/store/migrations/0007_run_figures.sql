-- The aggregator's figures per run name read these every few seconds: the running runs by name,
-- and the runs created in the last window. Without these indexes both scan every run ever made.
CREATE INDEX runs_running_name ON runs (name) WHERE state = 'running';
CREATE INDEX runs_created_at ON runs (created_at);
