-- Reconciliation: runs that compare what a channel says was paid and
-- refunded with what Entitle fulfilled, for a window of time.

CREATE TABLE reconciliation_run (
    id                uuid PRIMARY KEY,
    channel           text NOT NULL,
    window_start      timestamptz NOT NULL,
    window_end        timestamptz NOT NULL CHECK (window_end > window_start),
    -- 'schedule' or who asked ('operator:<token name>').
    trigger           text NOT NULL,
    status            text NOT NULL DEFAULT 'queued'
                      CHECK (status IN ('queued', 'running', 'finished', 'failed')),
    created_at        timestamptz NOT NULL DEFAULT now(),
    started_at        timestamptz,
    finished_at       timestamptz,
    duration_ms       bigint,
    -- Records read from the channel and Entitle orders compared.
    channel_records   bigint NOT NULL DEFAULT 0,
    entitle_orders    bigint NOT NULL DEFAULT 0,
    -- New findings by kind, findings seen again, actions taken.
    counts            jsonb NOT NULL DEFAULT '{}'::jsonb,
    -- Peak resident memory of the process during the run.
    peak_memory_bytes bigint,
    error             text
);
CREATE INDEX reconciliation_run_created_idx ON reconciliation_run (created_at DESC);

-- The channel's orders a run has seen, so Entitle's orders the channel does
-- not know are found by an anti-join in Postgres, not in the worker's memory.
-- Rows are scratch: removed when the run ends.
CREATE UNLOGGED TABLE reconciliation_seen (
    run_id            uuid NOT NULL,
    channel_order_id  text NOT NULL,
    PRIMARY KEY (run_id, channel_order_id)
);

-- Entitle's side of a window: a channel's orders by when they were paid.
CREATE INDEX orders_channel_paid_idx ON orders (channel, paid_at);
CREATE INDEX webhook_inbox_failed_idx ON webhook_inbox (received_at) WHERE status = 'failed';
CREATE INDEX email_delivery_failed_idx ON email_delivery (created_at) WHERE status = 'failed';
CREATE INDEX activation_code_orphan_idx ON activation_code (issued_at)
    WHERE order_line_id IS NULL AND batch_id IS NULL;
