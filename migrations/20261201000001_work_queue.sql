-- Postgres is where work waits. Redis holds only a bounded window of ready
-- work, fed from these columns in batches; everything else (a backlog, a
-- retry's backoff, a gift's send date) waits here, so a backlog of any size
-- costs Redis nothing and survives a flush.
--
-- A row is *ready* when it is unfinished, due, and not leased. Feeding it to
-- Redis leases it under a token for a short while; the worker that takes the
-- job claims the rows by that token and extends the lease while it works. A
-- lease that lapses (the worker died, Redis lost the job) makes the row ready
-- again within seconds, whoever was holding it.

ALTER TABLE webhook_inbox
    -- When the next attempt may start: on arrival, or after a retry's backoff.
    ADD COLUMN due_at timestamptz NOT NULL DEFAULT now(),
    -- Fed to the queue or being processed until then, under this token.
    ADD COLUMN leased_until timestamptz,
    ADD COLUMN lease_token uuid,
    DROP COLUMN requeued_at;
UPDATE webhook_inbox SET due_at = received_at;
DROP INDEX webhook_inbox_unfinished_idx;
CREATE INDEX webhook_inbox_ready_idx ON webhook_inbox (due_at) WHERE status = 'pending';

ALTER TABLE email_delivery
    -- send_after stays what was asked for (a gift's date); due_at is when the
    -- next attempt may start (send_after, or later after a failed attempt).
    ADD COLUMN due_at timestamptz NOT NULL DEFAULT now(),
    ADD COLUMN lease_token uuid,
    -- Why the last attempt failed, as a stable code (smtp_unavailable,
    -- recipient_refused, template_failed, ...).
    ADD COLUMN error_code text,
    DROP COLUMN requeued_at;
-- The sender's claim and the queue's lease are one thing.
ALTER TABLE email_delivery RENAME COLUMN claimed_until TO leased_until;
UPDATE email_delivery SET due_at = send_after;
DROP INDEX email_delivery_unfinished_idx;
CREATE INDEX email_delivery_ready_idx ON email_delivery (due_at) WHERE status IN ('pending', 'sending');

-- Runs asked for on demand wait queued here until a worker takes one.
ALTER TABLE reconciliation_run ADD COLUMN leased_until timestamptz;
CREATE INDEX reconciliation_run_queued_idx ON reconciliation_run (created_at) WHERE status = 'queued';

-- A delivery due when none of its codes is usable any more (a gift refunded
-- before its date) is not sent: it is skipped, with its reason.
ALTER TABLE email_delivery DROP CONSTRAINT email_delivery_status_check;
ALTER TABLE email_delivery ADD CONSTRAINT email_delivery_status_check
    CHECK (status IN ('pending', 'sending', 'sent', 'failed', 'skipped'));

-- Leasing and claiming change no indexed column. With room left on each
-- page they are HOT updates: no new index entries, and the page prunes its
-- own old versions, so a queue drained at full speed does not bloat its
-- indexes between vacuums. (Affects pages written from now on.)
ALTER TABLE webhook_inbox SET (fillfactor = 70);
ALTER TABLE email_delivery SET (fillfactor = 80);
