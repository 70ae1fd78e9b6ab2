-- Push (issue 13): the scheduler watches mailboxes over IDLE or NOTIFY.
-- `push` is a mailbox's own switch (`mailbox update --push/--no-push`); MAILFERRY_PUSH=0 turns
-- watching off for the whole deployment. mailbox_watches holds the watch lease: one scheduler
-- process (`holder`) watches a mailbox until `lease_expires_at`; `token` grows at every claim and
-- fences a holder that lost its lease (its renewals and state writes match no row). `state` is
-- what `mailbox list` and `status` show. push_schedulers is each scheduler's heartbeat: the
-- number of live ones sets each one's fair share of the watches (rebalancing).
-- depends: 0013_oauth2

ALTER TABLE mailboxes ADD COLUMN push boolean NOT NULL DEFAULT true;

CREATE TABLE mailbox_watches (
    mailbox_id        bigint PRIMARY KEY REFERENCES mailboxes (id) ON DELETE CASCADE,
    token             bigint NOT NULL DEFAULT 0,
    holder            text,
    lease_expires_at  timestamptz,
    state             text NOT NULL DEFAULT 'off'
                      CHECK (state IN ('watching', 'polling', 'backoff', 'off')),
    mode              text,
    error             text,
    changed_at        timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX mailbox_watches_holder_idx ON mailbox_watches (holder);

CREATE TABLE push_schedulers (
    id          text PRIMARY KEY,
    expires_at  timestamptz NOT NULL
);

-- A push run syncs only the folders that changed: it must not postpone the scheduled full sync,
-- so the due index's `sync_requested_at` (migration 0011) leaves push runs out.
CREATE OR REPLACE FUNCTION mailferry_sync_requested() RETURNS trigger
    LANGUAGE plpgsql AS $$
DECLARE
    target bigint := CASE WHEN TG_OP = 'DELETE' THEN OLD.mailbox_id ELSE NEW.mailbox_id END;
BEGIN
    UPDATE mailboxes m
       SET sync_requested_at = COALESCE(
               (SELECT max(r.requested_at) FROM sync_runs r
                 WHERE r.mailbox_id = target AND r.kind = 'mailbox'
                   AND r.requested_by <> 'push'), '-infinity')
     WHERE m.id = target;
    RETURN NULL;
END $$;
