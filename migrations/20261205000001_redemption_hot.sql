-- Redemption is the platform's hot path. Its update of the code changes only
-- `state` and `redeemed_at`; when no index covers either (nor names them in a
-- predicate) and the page has room, Postgres makes it a HOT update: a new row
-- version on the same page and no new entry in any of the table's indexes.
-- Before this, every redemption added an entry to each of the code's seven
-- or eight indexes.

-- The expiry sweep's index named `state` in its predicate. It now holds every
-- code whose expiry the sweep has not yet passed, whatever its state; the
-- sweep marks each code it passes (expiring it if it was still issued), so
-- the index stays the size of the codes still to expire, not of all codes.
ALTER TABLE activation_code ADD COLUMN swept_at timestamptz;
COMMENT ON COLUMN activation_code.swept_at IS
    'When the expiry sweep passed the code''s expiry (and expired it if it was issued); '
    'cleared when its expiry moves or it is issued again';
UPDATE activation_code SET swept_at = coalesce(expired_at, now())
WHERE expires_at <= now() AND state <> 'issued';
DROP INDEX activation_code_expiry_idx;
CREATE INDEX activation_code_expiry_idx ON activation_code (expires_at) WHERE swept_at IS NULL;

-- Only the console's "redeemed today" count used it; that count reads the
-- day's audit events by time instead.
DROP INDEX activation_code_redeemed_idx;

-- Room on each page for a code's redeemed version next to its issued one
-- (applies to pages written from now on).
ALTER TABLE activation_code SET (fillfactor = 85);
