-- The change stream for integrators (shared/outbox.py): every change the persister commits is
-- also written here, in the same transaction, then published to the `mailferry.changes` exchange
-- by the relay (services/persister/relay.py) and kept MAILFERRY_CHANGES_RETENTION seconds for
-- consumers catching up (`mailferry changes list --since SEQ`).
-- depends: 0011_due_index

-- The mailbox's last change sequence number: taken under the mailbox row's lock (the last lock
-- of a persister transaction, shared/runs.py), so numbers are gap-free and in commit order.
ALTER TABLE mailboxes ADD COLUMN change_seq bigint NOT NULL DEFAULT 0;

-- A folder is announced (FolderCreated) once; a placeholder row made before its listing was
-- applied (events arrive in any order) is announced when the listing comes. The folders that
-- exist already are not announced.
ALTER TABLE folders ADD COLUMN announced_at timestamptz;
UPDATE folders SET announced_at = created_at;

CREATE TABLE change_outbox (
    id            bigserial PRIMARY KEY,  -- the relay publishes in this order
    event_id      uuid NOT NULL UNIQUE,   -- the event's stable id: a change is written once
    -- no foreign key: removing a mailbox deletes its rows (shared/app/removal.py) itself
    mailbox_id    bigint NOT NULL,
    seq           bigint NOT NULL,
    type          text NOT NULL,
    payload       jsonb NOT NULL,         -- the event as published (shared/messages.py)
    created_at    timestamptz NOT NULL DEFAULT now(),
    published_at  timestamptz,            -- confirmed by RabbitMQ
    UNIQUE (mailbox_id, seq)
);
CREATE INDEX change_outbox_unpublished_idx ON change_outbox (id) WHERE published_at IS NULL;
CREATE INDEX change_outbox_created_idx ON change_outbox (created_at);
