-- Push (issue 13): the scheduler watches mailboxes over IDLE or NOTIFY.
-- `push` is a mailbox's own switch (`mailbox update --push/--no-push`); MAILFERRY_PUSH=0 turns
-- watching off for the whole deployment. mailbox_watches holds the watch lease: one scheduler
-- process (`holder`) watches a mailbox until `lease_expires_at`; `token` grows at every claim and
-- fences a holder that lost its lease (its renewals and state writes match no row). `state` is
-- what `mailbox list` and `status` show. push_schedulers is each scheduler's heartbeat: the
-- number of live ones sets each one's fair share of the watches (rebalancing).
-- depends: 0009_mailbox_removal

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
