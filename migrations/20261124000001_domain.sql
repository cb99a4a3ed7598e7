-- Entitle's domain model: catalogue, webhook inbox, orders, codes, batches,
-- assignments, email deliveries and the append-only audit log.
--
-- Idempotency lives here, not in application code: every effect that a
-- retried or duplicated job could repeat is guarded by a unique key.

-- Catalogue ------------------------------------------------------------------

CREATE TABLE product (
    id              uuid PRIMARY KEY,
    -- Our own stable key for the product, used by the catalogue file.
    sku             text NOT NULL UNIQUE,
    name            text NOT NULL,
    validity_days   integer NOT NULL CHECK (validity_days > 0),
    -- Name of the email template family used for this product's codes.
    email_template  text NOT NULL DEFAULT 'default',
    active          boolean NOT NULL DEFAULT true,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);

-- Maps a channel's own reference (Stripe price id, Shopify variant id or SKU,
-- native SKU) to a product. Unknown references are reported, never guessed.
CREATE TABLE channel_product (
    channel     text NOT NULL,
    reference   text NOT NULL,
    product_id  uuid NOT NULL REFERENCES product (id),
    PRIMARY KEY (channel, reference)
);

-- Orders -----------------------------------------------------------------------

CREATE TABLE orders (
    id                    uuid PRIMARY KEY,
    channel               text NOT NULL,
    -- The channel's identifier for the purchase (Stripe Checkout Session id,
    -- Shopify order id, native order id).
    channel_order_id      text NOT NULL,
    buyer_email           text NOT NULL,
    buyer_name            text,
    -- The platform account of the buyer, when the channel knows it. Linking
    -- an order to an account does not assign its codes.
    account_id            text,
    gift_recipient_email  text,
    gift_recipient_name   text,
    gift_message          text,
    gift_send_at          timestamptz,
    currency              text,
    -- Money in the currency's minor unit (cents), as the channel reports it.
    amount_total          bigint,
    state                 text NOT NULL DEFAULT 'paid'
                          CHECK (state IN ('paid', 'partially_refunded', 'refunded', 'cancelled')),
    paid_at               timestamptz,
    created_at            timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT orders_channel_order_key UNIQUE (channel, channel_order_id)
);
CREATE INDEX orders_buyer_email_idx ON orders (lower(buyer_email));
CREATE INDEX orders_account_idx ON orders (account_id) WHERE account_id IS NOT NULL;

CREATE TABLE order_line (
    id                 uuid PRIMARY KEY,
    order_id           uuid NOT NULL REFERENCES orders (id),
    line_index         integer NOT NULL,
    -- The channel reference the line was bought under (price id, variant, SKU).
    channel_reference  text NOT NULL,
    product_id         uuid NOT NULL REFERENCES product (id),
    quantity           integer NOT NULL CHECK (quantity > 0),
    unit_amount        bigint,
    amount_total       bigint,
    -- Units refunded so far; partial refunds revoke this many codes.
    refunded_quantity  integer NOT NULL DEFAULT 0 CHECK (refunded_quantity >= 0),
    CONSTRAINT order_line_position_key UNIQUE (order_id, line_index)
);

-- Codes --------------------------------------------------------------------------

-- Codes created outside checkout: customer service, partner distribution,
-- test accounts, replacements.
CREATE TABLE code_batch (
    id            uuid PRIMARY KEY,
    product_id    uuid NOT NULL REFERENCES product (id),
    kind          text NOT NULL
                  CHECK (kind IN ('customer_service', 'partner_distribution', 'test_account', 'replacement')),
    quantity      integer NOT NULL CHECK (quantity > 0),
    requested_by  text NOT NULL,
    reason        text NOT NULL,
    account_id    text,
    order_id      uuid REFERENCES orders (id),
    -- A batch's codes can be exported once (to hand to a partner).
    exported_at   timestamptz,
    created_at    timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE activation_code (
    id             uuid PRIMARY KEY,
    product_id     uuid NOT NULL REFERENCES product (id),
    -- HMAC-SHA256 of the normalised code under the configured hashing key:
    -- the only way a typed code is looked up.
    code_hash      bytea NOT NULL,
    -- The code encrypted (XChaCha20-Poly1305) under the sealing key, kept so
    -- it can be delivered again; never shown in views.
    code_sealed    bytea NOT NULL,
    -- The last four symbols, the only part of a code views display.
    last4          text NOT NULL,
    state          text NOT NULL DEFAULT 'issued'
                   CHECK (state IN ('issued', 'redeemed', 'revoked', 'expired')),
    -- Origin: a unit of an order line, or a batch.
    order_line_id  uuid REFERENCES order_line (id),
    unit_index     integer,
    batch_id       uuid REFERENCES code_batch (id),
    -- A reissued code points at the code it replaces.
    replaces       uuid REFERENCES activation_code (id),
    issued_at      timestamptz NOT NULL DEFAULT now(),
    expires_at     timestamptz NOT NULL,
    redeemed_at    timestamptz,
    revoked_at     timestamptz,
    expired_at     timestamptz,
    CONSTRAINT activation_code_hash_key UNIQUE (code_hash),
    -- One code per purchased unit, however often issuance runs.
    CONSTRAINT activation_code_unit_key UNIQUE (order_line_id, unit_index),
    CONSTRAINT activation_code_unit_pairing CHECK ((order_line_id IS NULL) = (unit_index IS NULL))
);
CREATE INDEX activation_code_line_idx ON activation_code (order_line_id);
CREATE INDEX activation_code_batch_idx ON activation_code (batch_id) WHERE batch_id IS NOT NULL;
CREATE INDEX activation_code_expiry_idx ON activation_code (expires_at) WHERE state = 'issued';

-- Who a code is assigned to. Reassignment ends the current row and starts a
-- new one, so history is kept.
CREATE TABLE assignment (
    id           uuid PRIMARY KEY,
    code_id      uuid NOT NULL REFERENCES activation_code (id),
    account_id   text NOT NULL,
    -- The person or thing the entitlement is for (e.g. a profile id).
    entity_ref   text NOT NULL,
    assigned_at  timestamptz NOT NULL DEFAULT now(),
    assigned_by  text NOT NULL,
    ended_at     timestamptz,
    ended_reason text
);
CREATE UNIQUE INDEX assignment_current_key ON assignment (code_id) WHERE ended_at IS NULL;
CREATE INDEX assignment_account_idx ON assignment (account_id);

-- Intake -------------------------------------------------------------------------

-- Every authentic webhook, kept before it is acknowledged.
CREATE TABLE webhook_inbox (
    id            uuid PRIMARY KEY,
    channel       text NOT NULL,
    -- The channel's own event id (Stripe event id, Shopify webhook id, ...).
    event_id      text NOT NULL,
    event_type    text NOT NULL,
    -- The raw body exactly as received; pruned after the retention period.
    body          text,
    received_at   timestamptz NOT NULL DEFAULT now(),
    status        text NOT NULL DEFAULT 'pending'
                  CHECK (status IN ('pending', 'processed', 'ignored', 'failed')),
    attempts      integer NOT NULL DEFAULT 0,
    -- Stable error code and human detail of the last failure.
    error_code    text,
    last_error    text,
    processed_at  timestamptz,
    order_id      uuid REFERENCES orders (id),
    CONSTRAINT webhook_inbox_event_key UNIQUE (channel, event_id)
);
CREATE INDEX webhook_inbox_unfinished_idx ON webhook_inbox (received_at) WHERE status = 'pending';

-- Email ----------------------------------------------------------------------------

CREATE TABLE email_delivery (
    id               uuid PRIMARY KEY,
    order_id         uuid REFERENCES orders (id),
    kind             text NOT NULL,
    recipient_email  text NOT NULL,
    recipient_name   text,
    status           text NOT NULL DEFAULT 'pending'
                     CHECK (status IN ('pending', 'sending', 'sent', 'failed')),
    attempts         integer NOT NULL DEFAULT 0,
    last_error       text,
    -- Not before this time (gifts scheduled for a date).
    send_after       timestamptz NOT NULL DEFAULT now(),
    -- A sender holds the row until then; a crashed sender's claim lapses.
    claimed_until    timestamptz,
    -- Stable per delivery, so a message sent twice can be recognised as one.
    message_id       text NOT NULL,
    provider_response text,
    sent_at          timestamptz,
    created_at       timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT email_delivery_message_id_key UNIQUE (message_id)
);
CREATE INDEX email_delivery_order_idx ON email_delivery (order_id);
CREATE INDEX email_delivery_unfinished_idx ON email_delivery (send_after) WHERE status IN ('pending', 'sending');

-- The codes a delivery carries.
CREATE TABLE email_delivery_code (
    delivery_id  uuid NOT NULL REFERENCES email_delivery (id),
    code_id      uuid NOT NULL REFERENCES activation_code (id),
    position     integer NOT NULL,
    PRIMARY KEY (delivery_id, code_id)
);

-- Audit ------------------------------------------------------------------------------

CREATE TABLE audit_event (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    occurred_at   timestamptz NOT NULL DEFAULT now(),
    -- Who: 'system:worker', 'system:gateway', 'customer:<account>', or an
    -- admin token's name.
    actor         text NOT NULL,
    action        text NOT NULL,
    subject_type  text NOT NULL,
    subject_id    text NOT NULL,
    reason        text,
    -- Before/after state and other context; never a full code.
    data          jsonb NOT NULL DEFAULT '{}'::jsonb
);
CREATE INDEX audit_event_subject_idx ON audit_event (subject_type, subject_id, id);
CREATE INDEX audit_event_actor_idx ON audit_event (actor, id);
CREATE INDEX audit_event_time_idx ON audit_event (occurred_at);

-- The database itself refuses to rewrite history, whoever asks.
CREATE FUNCTION audit_event_append_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_event is append-only: % is not allowed', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END;
$$;

CREATE TRIGGER audit_event_no_update_or_delete
    BEFORE UPDATE OR DELETE ON audit_event
    FOR EACH ROW EXECUTE FUNCTION audit_event_append_only();

CREATE TRIGGER audit_event_no_truncate
    BEFORE TRUNCATE ON audit_event
    FOR EACH STATEMENT EXECUTE FUNCTION audit_event_append_only();
