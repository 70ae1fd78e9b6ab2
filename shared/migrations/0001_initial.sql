-- The core store: users, mailboxes, folders, messages (raw bytes once per content hash), their
-- places in folders, and sync runs with their per-attempt progress.
-- depends:

CREATE TABLE users (
    id            bigserial PRIMARY KEY,
    email         text NOT NULL,
    name          text,
    enabled       boolean NOT NULL DEFAULT true,
    capabilities  text[] NOT NULL DEFAULT '{}',
    created_at    timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX users_email_key ON users (lower(email));

CREATE TABLE mailboxes (
    id                  bigserial PRIMARY KEY,
    owner_id            bigint REFERENCES users (id) ON DELETE CASCADE,  -- NULL: system mailbox
    name                text NOT NULL,
    host                text NOT NULL,
    port                integer NOT NULL CHECK (port BETWEEN 1 AND 65535),
    security            text NOT NULL CHECK (security IN ('ssl', 'starttls', 'none')),
    username            text NOT NULL,
    password_encrypted  bytea NOT NULL,
    sync_enabled        boolean NOT NULL DEFAULT true,
    first_sync_days     integer CHECK (first_sync_days > 0),  -- NULL: the setting's default
    initial_folders     text[],  -- folders enabled on discovery; NULL: inbox and sent
    -- the fetcher lease; lease_token is the fencing token and only ever grows
    lease_token         bigint NOT NULL DEFAULT 0,
    lease_owner         text,
    lease_expires_at    timestamptz,
    -- sync state, written by the persister
    last_sync_at        timestamptz,
    last_sync_status    text,
    last_error          text,
    last_error_kind     text,
    credentials_invalid_at timestamptz,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX mailboxes_owner_idx ON mailboxes (owner_id);

CREATE TABLE folders (
    id              bigserial PRIMARY KEY,
    mailbox_id      bigint NOT NULL REFERENCES mailboxes (id) ON DELETE CASCADE,
    name            text NOT NULL,
    raw_name        text NOT NULL,
    delimiter       text,
    flags           text[] NOT NULL DEFAULT '{}',
    type            text NOT NULL DEFAULT 'other'
                    CHECK (type IN ('inbox', 'sent', 'drafts', 'trash', 'spam', 'archive', 'other')),
    selectable      boolean NOT NULL DEFAULT true,
    sync_enabled    boolean NOT NULL DEFAULT false,
    uidvalidity     bigint,
    last_uid        bigint NOT NULL DEFAULT 0,
    uidnext         bigint,
    highest_modseq  bigint,
    last_synced_at  timestamptz,
    last_error      text,
    gone_at         timestamptz,  -- deleted on the server, kept because it holds synced mail
    created_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (mailbox_id, raw_name)
);

CREATE TABLE raw_messages (
    sha256      bytea PRIMARY KEY,
    size        bigint NOT NULL,
    data        bytea NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
ALTER TABLE raw_messages ALTER COLUMN data SET STORAGE EXTERNAL;

CREATE TABLE messages (
    id            bigserial PRIMARY KEY,
    mailbox_id    bigint NOT NULL REFERENCES mailboxes (id) ON DELETE CASCADE,
    sha256        bytea NOT NULL REFERENCES raw_messages (sha256),
    size          bigint NOT NULL,
    message_id    text,
    subject       text,
    from_addr     text,
    to_addrs      text[] NOT NULL DEFAULT '{}',
    cc_addrs      text[] NOT NULL DEFAULT '{}',
    bcc_addrs     text[] NOT NULL DEFAULT '{}',
    sent_at       timestamptz,
    in_reply_to   text,
    refs          text[] NOT NULL DEFAULT '{}',
    importance    text NOT NULL DEFAULT 'normal',
    body_text     text,
    body_html     text,
    attachments   jsonb NOT NULL DEFAULT '[]',
    parse_errors  text[] NOT NULL DEFAULT '{}',
    created_at    timestamptz NOT NULL DEFAULT now(),
    UNIQUE (mailbox_id, sha256)
);
CREATE INDEX messages_message_id_idx ON messages (mailbox_id, message_id);

CREATE TABLE message_folders (
    folder_id      bigint NOT NULL REFERENCES folders (id) ON DELETE CASCADE,
    uidvalidity    bigint NOT NULL,
    uid            bigint NOT NULL,
    message_id     bigint REFERENCES messages (id) ON DELETE CASCADE,
    flags          text[] NOT NULL DEFAULT '{}',
    seen           boolean NOT NULL DEFAULT false,
    modseq         bigint,
    internal_date  timestamptz,
    size           bigint,
    skipped_reason text,               -- the bytes were not carried (too large)
    expunged_at    timestamptz,  -- a tombstone: a late insert cannot bring the UID back
    created_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (folder_id, uidvalidity, uid)
);
CREATE INDEX message_folders_message_idx ON message_folders (message_id);

CREATE TABLE sync_runs (
    id             uuid PRIMARY KEY,
    mailbox_id     bigint NOT NULL REFERENCES mailboxes (id) ON DELETE CASCADE,
    status         text NOT NULL CHECK (status IN ('queued', 'running', 'done', 'failed', 'expired')),
    force          boolean NOT NULL DEFAULT false,
    requested_by   text NOT NULL,
    requested_at   timestamptz NOT NULL DEFAULT now(),
    started_at     timestamptz,
    finished_at    timestamptz,
    lease_token    bigint,            -- the attempt whose events count
    folders_listed boolean NOT NULL DEFAULT false,
    folders_expected integer,         -- set by SyncFinished
    messages_stored integer NOT NULL DEFAULT 0,
    error_kind     text,
    error          text
);
-- at most one queued-or-running run per mailbox: two schedulers cannot double the work
CREATE UNIQUE INDEX sync_runs_one_active ON sync_runs (mailbox_id)
    WHERE status IN ('queued', 'running');
CREATE INDEX sync_runs_mailbox_idx ON sync_runs (mailbox_id, requested_at DESC);

-- per attempt and folder: how many batches the fetcher announced and which ones are stored
CREATE TABLE sync_folders (
    run_id         uuid NOT NULL REFERENCES sync_runs (id) ON DELETE CASCADE,
    lease_token    bigint NOT NULL,
    folder         text NOT NULL,
    uidvalidity    bigint,
    batches        integer,          -- NULL until FolderSynced arrives
    last_uid       bigint,
    uidnext        bigint,
    highest_modseq bigint,
    messages       integer,
    error          text,
    completed      boolean NOT NULL DEFAULT false,
    PRIMARY KEY (run_id, lease_token, folder)
);
CREATE TABLE sync_batches (
    run_id       uuid NOT NULL,
    lease_token  bigint NOT NULL,
    folder       text NOT NULL,
    batch_no     integer NOT NULL,
    messages     integer NOT NULL,
    PRIMARY KEY (run_id, lease_token, folder, batch_no)
);

CREATE TABLE notifications (
    id            bigserial PRIMARY KEY,
    user_id       bigint NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    mailbox_id    bigint REFERENCES mailboxes (id) ON DELETE CASCADE,
    kind          text NOT NULL,
    dedup_key     text NOT NULL,  -- one notification per recipient and fact, however often told
    title         text NOT NULL,
    body          text NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    read_at       timestamptz
);
CREATE UNIQUE INDEX notifications_dedup_key ON notifications (user_id, dedup_key);
CREATE INDEX notifications_pending_idx ON notifications (user_id) WHERE read_at IS NULL;
