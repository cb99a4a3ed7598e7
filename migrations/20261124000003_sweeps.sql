-- Scheduled sweeps: one row per job and tick, claimed by whichever worker
-- process gets there first, so a tick runs once however many workers fire it.
CREATE TABLE sweep_run (
    job          text NOT NULL,
    tick_at      timestamptz NOT NULL,
    worker       text NOT NULL,
    started_at   timestamptz NOT NULL DEFAULT now(),
    finished_at  timestamptz,
    -- What the run did (counts), or why it failed.
    summary      jsonb NOT NULL DEFAULT '{}'::jsonb,
    PRIMARY KEY (job, tick_at)
);

-- When the sweep last put the row back on the queue, so a row that is
-- legitimately retrying is not enqueued again every tick.
ALTER TABLE webhook_inbox ADD COLUMN requeued_at timestamptz;
ALTER TABLE email_delivery ADD COLUMN requeued_at timestamptz;
