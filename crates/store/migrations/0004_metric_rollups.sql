-- The aggregator's history: per minute (of the events' own time) and series (queue, kind,
-- priority), what happened since its previous write. Rows are appended, never updated, so a
-- late event or a second aggregator only adds a row; readers sum a minute's rows (and merge
-- its histograms: HDR histograms of milliseconds in V2 serialization).
CREATE TABLE metric_rollups (
    minute            timestamptz      NOT NULL,
    queue             text             NOT NULL,
    kind              text             NOT NULL,
    priority          text             NOT NULL,
    written_at        timestamptz      NOT NULL DEFAULT now(),
    finals            bigint           NOT NULL,
    succeeded         bigint           NOT NULL,
    failed            bigint           NOT NULL,
    dead              bigint           NOT NULL,
    cancelled         bigint           NOT NULL,
    retries           bigint           NOT NULL,
    attempts          bigint           NOT NULL,
    cache_hits        bigint           NOT NULL,
    prompt_tokens     bigint           NOT NULL,
    completion_tokens bigint           NOT NULL,
    cost_usd          double precision NOT NULL,
    saved_usd         double precision NOT NULL,
    queue_wait        bytea,
    run               bytea,
    end_to_end        bytea
);
CREATE INDEX metric_rollups_minute ON metric_rollups (minute);
