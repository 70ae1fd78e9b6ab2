-- The scheduler's tick costs what is due, not the size of the table (issue 11): with 100,000
-- mailboxes, finding the due ones was a probe into sync_runs for every mailbox (0.5-1.4 s).
--
-- Each mailbox now carries when its latest mail sync was asked for (`sync_requested_at`,
-- '-infinity' if never), and a partial index over the mailboxes the scheduler may sync orders
-- them by it: the due ones are one range scan of that index. The column is a copy of
-- max(sync_runs.requested_at) over the mailbox's 'mailbox' runs, kept by a trigger on
-- sync_runs, so it holds whoever writes the runs (shared/runs.py) and whatever moves a run's
-- requested_at (tests and benches age runs that way).
--
-- The expiry of stale runs reads only the active ones, oldest first: a partial index on
-- requested_at, as small as the number of runs queued or running.
-- depends: 0009_mailbox_removal

ALTER TABLE mailboxes ADD COLUMN sync_requested_at timestamptz NOT NULL DEFAULT '-infinity';

UPDATE mailboxes m SET sync_requested_at = r.at
  FROM (SELECT mailbox_id, max(requested_at) AS at FROM sync_runs
         WHERE kind = 'mailbox' GROUP BY mailbox_id) AS r
 WHERE r.mailbox_id = m.id;

CREATE INDEX mailboxes_due_idx ON mailboxes (sync_requested_at, id)
    WHERE sync_enabled AND credentials_invalid_at IS NULL AND removing_at IS NULL;

CREATE INDEX sync_runs_active_age_idx ON sync_runs (requested_at)
    WHERE status IN ('queued', 'running');

CREATE FUNCTION mailferry_sync_requested() RETURNS trigger
    LANGUAGE plpgsql AS $$
DECLARE
    target bigint := CASE WHEN TG_OP = 'DELETE' THEN OLD.mailbox_id ELSE NEW.mailbox_id END;
BEGIN
    UPDATE mailboxes m
       SET sync_requested_at = COALESCE(
               (SELECT max(r.requested_at) FROM sync_runs r
                 WHERE r.mailbox_id = target AND r.kind = 'mailbox'), '-infinity')
     WHERE m.id = target;
    RETURN NULL;
END $$;

-- A new mail run, a run's requested_at moved, a queued run withdrawn (never published).
CREATE TRIGGER sync_runs_requested_at AFTER INSERT OR UPDATE OF requested_at ON sync_runs
    FOR EACH ROW WHEN (NEW.kind = 'mailbox') EXECUTE FUNCTION mailferry_sync_requested();
CREATE TRIGGER sync_runs_withdrawn AFTER DELETE ON sync_runs
    FOR EACH ROW WHEN (OLD.kind = 'mailbox' AND OLD.status = 'queued')
    EXECUTE FUNCTION mailferry_sync_requested();
