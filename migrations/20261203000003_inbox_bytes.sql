-- A webhook's body is kept exactly as it arrived, so its signature can be
-- checked again later. Text holds most bodies exactly: every body of valid
-- UTF-8 without NUL, which is all JSON a channel sends, stays in `body` as
-- before (no second copy: intake writes what it wrote). Any other body
-- (a stray non-UTF-8 byte, a NUL) is kept here, byte for byte, and `body`
-- then holds a readable rendering of it (U+FFFD for what text cannot
-- hold), for people and for the prune sweep. Reads take `body_bytes` when
-- it is set, else the text: rows filed before this column read as before.
ALTER TABLE webhook_inbox ADD COLUMN body_bytes bytea;

-- The exact bytes never outlive the body: the prune sweep clears `body`,
-- and that clears these too.
CREATE FUNCTION webhook_inbox_body_bytes_pruned() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.body_bytes := NULL;
    RETURN NEW;
END
$$;
CREATE TRIGGER webhook_inbox_body_pruned
    BEFORE UPDATE OF body ON webhook_inbox
    FOR EACH ROW WHEN (NEW.body IS NULL AND NEW.body_bytes IS NOT NULL)
    EXECUTE FUNCTION webhook_inbox_body_bytes_pruned();

-- Bytes only ever sit beside their rendering. NOT VALID: every row before
-- this migration has no bytes, so there is nothing to scan.
ALTER TABLE webhook_inbox ADD CONSTRAINT webhook_inbox_body_bytes_rendered
    CHECK (body_bytes IS NULL OR body IS NOT NULL) NOT VALID;
