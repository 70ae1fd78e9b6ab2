-- Provider limits (README "Provider limits").
-- A throttled mailbox (the server said [THROTTLED], [OVERQUOTA], [UNAVAILABLE], "too many
-- simultaneous connections", or closed with a rate-limit text) is not synced again before
-- throttled_until; throttle_count makes the back-off grow while it keeps happening. Both are
-- written by shared/runs.py only, and cleared by a sync that completes.
-- depends: 0015_change_outbox

ALTER TABLE mailboxes ADD COLUMN throttled_until timestamptz,
                      ADD COLUMN throttle_count integer NOT NULL DEFAULT 0;

-- The scheduler's second range scan (shared/sync_requests.py DUE_MAILBOXES): the mailboxes
-- whose back-off may have ended, due at once then. As small as the throttled mailboxes (a sync
-- that completes clears throttled_until).
CREATE INDEX mailboxes_throttled_idx ON mailboxes (throttled_until)
    WHERE throttled_until IS NOT NULL
      AND sync_enabled AND credentials_invalid_at IS NULL AND removing_at IS NULL;

-- A first sync spread over days by the download budget, newest mail first: UIDs below
-- backfill_below (in the first-sync window) are not fetched yet. NULL: nothing is pending.
ALTER TABLE folders ADD COLUMN backfill_below bigint;
ALTER TABLE sync_folders ADD COLUMN backfill_below bigint;

-- What the fetchers downloaded per mailbox, one row per batch, for the rolling 24-hour budget
-- (shared/budget.py). Rows older than the window are deleted as they age out.
CREATE TABLE mailbox_downloads (
    mailbox_id  bigint NOT NULL REFERENCES mailboxes (id) ON DELETE CASCADE,
    at          timestamptz NOT NULL DEFAULT now(),
    bytes       bigint NOT NULL CHECK (bytes >= 0)
);
CREATE INDEX mailbox_downloads_idx ON mailbox_downloads (mailbox_id, at);
