-- Delivering the platform's events: the endpoints that hear them, one
-- delivery per event and endpoint, and every attempt (the delivery log).

-- Where events go. Endpoints come from the configuration file (`source`
-- config, kept in step at each worker start) or from the admin API. Secrets
-- are sealed with the code sealing key; during a rotation the previous one
-- signs too, until `previous_until`.
CREATE TABLE platform_endpoint (
    id                      uuid PRIMARY KEY,
    name                    text NOT NULL UNIQUE CHECK (length(name) BETWEEN 1 AND 100),
    url                     text NOT NULL CHECK (url ~ '^https?://'),
    source                  text NOT NULL CHECK (source IN ('config', 'admin')),
    -- The event types it hears; empty: every type.
    event_types             text[] NOT NULL DEFAULT '{}',
    secret_sealed           bytea NOT NULL,
    previous_secret_sealed  bytea,
    previous_until          timestamptz,
    created_by              text NOT NULL,
    created_at              timestamptz NOT NULL DEFAULT now(),
    disabled_at             timestamptz
);

-- One event to one endpoint. `seq` and `code_id` are the event's, copied so
-- the ordering rule (a code's next event waits for its earlier ones) is one
-- indexed look-up.
CREATE TABLE platform_delivery (
    id            uuid PRIMARY KEY,
    event_id      uuid NOT NULL REFERENCES platform_event (id),
    endpoint_id   uuid NOT NULL REFERENCES platform_endpoint (id),
    seq           bigint NOT NULL,
    code_id       uuid,
    -- pending: to be sent (again); delivered: a 2xx came back; failed: given
    -- up after `platform.retry_for_secs`, for operations to replay.
    status        text NOT NULL DEFAULT 'pending'
                  CHECK (status IN ('pending', 'delivered', 'failed')),
    attempts      integer NOT NULL DEFAULT 0,
    due_at        timestamptz NOT NULL DEFAULT now(),
    leased_until  timestamptz,
    lease_token   uuid,
    last_status   integer,
    last_error    text,
    delivered_at  timestamptz,
    created_at    timestamptz NOT NULL DEFAULT now(),
    UNIQUE (event_id, endpoint_id)
) WITH (fillfactor = 80);
CREATE INDEX platform_delivery_ready_idx ON platform_delivery (due_at) WHERE status = 'pending';
CREATE INDEX platform_delivery_code_idx ON platform_delivery (endpoint_id, code_id, seq)
    WHERE status = 'pending' AND code_id IS NOT NULL;
CREATE INDEX platform_delivery_event_idx ON platform_delivery (event_id);

-- Every attempt: when, what came back, how long it took.
CREATE TABLE platform_attempt (
    id           uuid PRIMARY KEY,
    delivery_id  uuid NOT NULL REFERENCES platform_delivery (id),
    attempted_at timestamptz NOT NULL DEFAULT now(),
    -- The HTTP status, or NULL when none came back (refused, timed out).
    status_code  integer,
    error        text,
    duration_ms  integer NOT NULL
);
CREATE INDEX platform_attempt_delivery_idx ON platform_attempt (delivery_id, attempted_at);

-- Each new event is due to every endpoint that hears its type, in the same
-- transaction that wrote it: no writer can forget an endpoint, and a
-- statement that writes many events (the expiry sweep) fans out in one go.
CREATE FUNCTION platform_event_fan_out() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO platform_delivery (id, event_id, endpoint_id, seq, code_id)
    SELECT gen_random_uuid(), a.id, e.id, a.seq, a.code_id
    FROM added a
    JOIN platform_endpoint e
      ON e.disabled_at IS NULL
     AND (cardinality(e.event_types) = 0 OR a.type = ANY (e.event_types));
    RETURN NULL;
END $$;
CREATE TRIGGER platform_event_fan_out AFTER INSERT ON platform_event
    REFERENCING NEW TABLE AS added FOR EACH STATEMENT EXECUTE FUNCTION platform_event_fan_out();
