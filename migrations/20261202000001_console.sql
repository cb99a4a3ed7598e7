-- The support console: staff accounts (the people who sign in to /console)
-- and their server-side sessions.

CREATE TABLE staff_member (
    id               uuid PRIMARY KEY,
    -- The actor every audit event of their console actions names, as a
    -- token's name is for API actions.
    name             text NOT NULL,
    email            text NOT NULL,
    role             text NOT NULL CHECK (role IN ('support', 'operator', 'admin')),
    -- argon2id PHC string ($argon2id$v=19$m=...,t=...,p=...$salt$hash).
    password_hash    text NOT NULL,
    -- A disabled member cannot sign in, and their sessions are deleted.
    disabled_at      timestamptz,
    created_at       timestamptz NOT NULL DEFAULT now(),
    last_sign_in_at  timestamptz,
    CONSTRAINT staff_member_name_key UNIQUE (name)
);
-- Emails are compared as people type them: case does not matter.
CREATE UNIQUE INDEX staff_member_email_key ON staff_member (lower(email));

-- tower-sessions records. Only a hash of the session id (the cookie's
-- value) is stored, so reading this table does not hand out sessions.
CREATE TABLE console_session (
    id_hash     bytea PRIMARY KEY,
    -- Whose session it is, once signed in: disabling a member deletes these.
    staff_id    uuid REFERENCES staff_member (id) ON DELETE CASCADE,
    data        jsonb NOT NULL,
    -- Moved forward on every request: the idle timeout.
    expires_at  timestamptz NOT NULL
);
CREATE INDEX console_session_expiry_idx ON console_session (expires_at);
CREATE INDEX console_session_staff_idx ON console_session (staff_id) WHERE staff_id IS NOT NULL;

-- The dashboard counts codes issued and redeemed today.
CREATE INDEX activation_code_redeemed_idx ON activation_code (redeemed_at) WHERE redeemed_at IS NOT NULL;
