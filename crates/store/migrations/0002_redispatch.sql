-- How many times a task has been published to the dispatch stream: the first dispatch is 1,
-- each rescue or replay adds one. It makes every dispatch's deduplication id unique
-- (`<id>:<dispatches>`), so a redispatch is never mistaken by JetStream for the lost original.
ALTER TABLE tasks ADD COLUMN dispatches integer NOT NULL DEFAULT 1;
