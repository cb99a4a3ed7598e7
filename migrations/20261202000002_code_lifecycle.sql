-- Why a code was revoked, which the lifecycle's rules depend on: a refund or
-- cancellation in the channel ('adjustment') must not be undone by a support
-- reissue without an explicit override, and a code already replaced must not
-- be replaced twice.
ALTER TABLE activation_code
    ADD COLUMN revoked_cause text
        CHECK (revoked_cause IN ('adjustment', 'support', 'reissue'));
CREATE INDEX activation_code_replaces_idx ON activation_code (replaces) WHERE replaces IS NOT NULL;
UPDATE activation_code c
SET revoked_cause = CASE
    WHEN EXISTS (SELECT 1 FROM activation_code r WHERE r.replaces = c.id) THEN 'reissue'
    WHEN EXISTS (SELECT 1 FROM audit_event e
                 WHERE e.subject_type = 'code' AND e.subject_id = c.id::text
                   AND e.action = 'code.revoked' AND e.actor = 'system:worker') THEN 'adjustment'
    ELSE 'support' END
WHERE c.state = 'revoked';

-- Refused redemption attempts on codes that exist ("my code doesn't work" is
-- the most common support question). Only the latest few per code are kept,
-- so hammering one code cannot grow the table.
CREATE TABLE redemption_refusal (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    code_id     uuid NOT NULL REFERENCES activation_code (id),
    refused_at  timestamptz NOT NULL DEFAULT now(),
    -- The stable error code the redeemer got: code_expired, code_revoked,
    -- code_already_redeemed.
    reason      text NOT NULL,
    account_id  text,
    entity_ref  text
);
CREATE INDEX redemption_refusal_code_idx ON redemption_refusal (code_id, id);

-- The console's search: orders by a gift recipient's email, and codes by
-- their last four symbols (narrowed by product or email).
CREATE INDEX orders_gift_recipient_email_idx ON orders (lower(gift_recipient_email))
    WHERE gift_recipient_email IS NOT NULL;
CREATE INDEX activation_code_last4_idx ON activation_code (last4);

-- The one-time key of the form (or request) that exported a batch: the same
-- form posted again (a double click) gets the file again; anything else is
-- refused, so the file still exists in one copy.
ALTER TABLE code_batch ADD COLUMN export_key text;
