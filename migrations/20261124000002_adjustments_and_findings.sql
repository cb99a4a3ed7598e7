-- Refunds and cancellations as their own records, so one that arrives before
-- its purchase waits for it; and findings, the exceptions operations review.

-- The channel's payment identifier (Stripe PaymentIntent), which refund
-- events name instead of the order.
ALTER TABLE orders ADD COLUMN payment_reference text;
-- Set once every unit has its code and the first deliveries exist; refunds
-- wait until then so they never race issuance.
ALTER TABLE orders ADD COLUMN issued_at timestamptz;
CREATE INDEX orders_payment_reference_idx ON orders (channel, payment_reference)
    WHERE payment_reference IS NOT NULL;

CREATE TABLE order_adjustment (
    id              uuid PRIMARY KEY,
    channel         text NOT NULL,
    -- What the channel calls the order: its order id or its payment reference.
    order_key       text NOT NULL,
    -- Unique per channel: the refund id, or a key derived from the event, so a
    -- repeated refund is applied once.
    adjustment_key  text NOT NULL,
    kind            text NOT NULL CHECK (kind IN ('refund', 'cancellation')),
    -- full: every unit; lines: [{"references": [...], "quantity": n}];
    -- amount: the channel's cumulative refunded amount.
    scope           text NOT NULL CHECK (scope IN ('full', 'lines', 'amount')),
    lines           jsonb NOT NULL DEFAULT '[]'::jsonb,
    amount          bigint,
    order_id        uuid REFERENCES orders (id),
    applied_at      timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT order_adjustment_key UNIQUE (channel, adjustment_key)
);
CREATE INDEX order_adjustment_pending_idx ON order_adjustment (channel, order_key)
    WHERE applied_at IS NULL;

-- Something operations must look at: produced by refunds now and by
-- reconciliation runs later.
CREATE TABLE reconciliation_finding (
    id                 uuid PRIMARY KEY,
    run_id             uuid,
    kind               text NOT NULL,
    status             text NOT NULL DEFAULT 'open'
                       CHECK (status IN ('open', 'resolved', 'ignored')),
    order_id           uuid REFERENCES orders (id),
    code_id            uuid REFERENCES activation_code (id),
    channel            text,
    channel_reference  text,
    detail             text NOT NULL,
    action_taken       text,
    -- The same mismatch found twice is one finding.
    dedupe_key         text NOT NULL,
    created_at         timestamptz NOT NULL DEFAULT now(),
    resolved_at        timestamptz,
    resolved_by        text,
    resolution_reason  text,
    CONSTRAINT reconciliation_finding_dedupe_key UNIQUE (dedupe_key)
);
CREATE INDEX reconciliation_finding_status_idx ON reconciliation_finding (status, kind);

-- An order's first deliveries are created once, whichever event gets there.
CREATE UNIQUE INDEX email_delivery_initial_key ON email_delivery (order_id, kind)
    WHERE kind IN ('order_codes', 'gift_codes', 'gift_receipt');
