-- Support and operations: API tokens with roles, and idempotency keys for
-- admin actions.

CREATE TABLE api_token (
    id          uuid PRIMARY KEY,
    -- Who the token is: the actor every audit event of its requests names.
    name        text NOT NULL,
    role        text NOT NULL CHECK (role IN ('support', 'operator', 'admin')),
    -- SHA-256 of the token; the token itself is shown once, at creation.
    token_hash  bytea NOT NULL,
    created_by  text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz,
    last_used_at timestamptz,
    CONSTRAINT api_token_hash_key UNIQUE (token_hash)
);
CREATE UNIQUE INDEX api_token_active_name_key ON api_token (name) WHERE revoked_at IS NULL;

-- An admin action retried with the same Idempotency-Key answers what it
-- answered the first time and does nothing again.
CREATE TABLE idempotency_key (
    actor          text NOT NULL,
    key            text NOT NULL,
    -- Method and path, and a hash of the body: the same key for another
    -- request is refused.
    request        text NOT NULL,
    request_hash   bytea NOT NULL,
    status         integer NOT NULL,
    response       jsonb NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (actor, key)
);

-- Deliveries made by support (resend, reissue) are not an order's first.
ALTER TABLE email_delivery ADD COLUMN requested_by text;
