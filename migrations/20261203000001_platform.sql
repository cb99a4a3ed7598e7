-- The platform seam: the keys the platform calls Entitle with, and the
-- outbox of events Entitle tells the platform about.

-- A platform's API key. Stored as an HMAC of the key (keyed with the code
-- hash key), so a hot-path check is one indexed lookup, not a password hash.
CREATE TABLE platform_key (
    id            uuid PRIMARY KEY,
    -- The caller recorded on each redemption: `platform:<name>`.
    name          text NOT NULL CHECK (length(name) BETWEEN 1 AND 100),
    key_hash      bytea NOT NULL UNIQUE,
    created_by    text NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    revoked_at    timestamptz,
    last_used_at  timestamptz
);
CREATE UNIQUE INDEX platform_key_active_name ON platform_key (name) WHERE revoked_at IS NULL;

-- Every change the platform hears about, written in the same transaction as
-- the change itself. `id` is the Standard Webhooks `webhook-id` (stable
-- across retries, for deduplication); `seq` orders a code's events.
CREATE TABLE platform_event (
    id          uuid PRIMARY KEY,
    seq         bigint GENERATED ALWAYS AS IDENTITY UNIQUE,
    -- order.fulfilled, code.redeemed, code.reassigned, code.unassigned,
    -- code.revoked, code.reissued, code.expired
    type        text NOT NULL,
    code_id     uuid REFERENCES activation_code (id),
    order_id    uuid REFERENCES orders (id),
    -- The event's `data` object: ids, last four symbols, product, account,
    -- entity. Never a whole code.
    data        jsonb NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX platform_event_code_idx ON platform_event (code_id, seq) WHERE code_id IS NOT NULL;
