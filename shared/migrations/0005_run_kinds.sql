-- A run either syncs a mailbox's mail or only its folder list (after its folder selection
-- changed: the folders are synchronized at once, the mail at the next sync).
-- depends: 0004_flag_versions

ALTER TABLE sync_runs ADD COLUMN kind text NOT NULL DEFAULT 'mailbox'
    CHECK (kind IN ('mailbox', 'folders'));
