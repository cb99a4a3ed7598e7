-- Indexes for two queries that read whole tables without them. Each is
-- checked with EXPLAIN in tests/tests/hardening_fixes.rs.

-- The findings export (admin API and console) pages through the findings in
-- (created_at, id) order, a thousand at a time after a cursor: each page is
-- a range of this index, however far into the findings it is. The list
-- (newest first) reads it backwards.
CREATE INDEX reconciliation_finding_export_idx ON reconciliation_finding (created_at, id);

-- The same for one run's findings (`?run=`, `entitlectl findings export
-- --run`): a run's few findings, not a walk past everyone else's.
CREATE INDEX reconciliation_finding_run_idx ON reconciliation_finding (run_id, created_at, id)
    WHERE run_id IS NOT NULL;

-- The prune sweep clears the bodies of finished events older than the
-- retention period. Only rows it may still prune are in here: a pruned body
-- (NULL) leaves the index, so it stays the size of the retention window
-- rather than of the whole inbox.
CREATE INDEX webhook_inbox_prune_idx ON webhook_inbox (received_at)
    WHERE body IS NOT NULL AND status <> 'pending';
