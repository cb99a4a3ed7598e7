-- Which catalogue the database holds: its `version` (from the file) and a
-- hash of its content. A process starting with another catalogue syncs it
-- only when its version is higher (the first process of a new configuration
-- version); otherwise the difference is reported, not raced. One row.
CREATE TABLE catalogue_state (
    singleton   boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    version     bigint NOT NULL,
    hash        bytea NOT NULL,
    products    integer NOT NULL,
    synced_at   timestamptz NOT NULL DEFAULT now(),
    synced_by   text NOT NULL
);
