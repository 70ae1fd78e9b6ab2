-- Parse off the critical path (issue 11): a message is stored with its raw bytes and
-- placement first, and its parsed columns (subject, addresses, bodies, attachments, parse
-- errors) are filled by the persister's parse step afterwards (shared/parsing.py).
-- parsed_at IS NULL: not parsed yet. Rows stored before this migration were parsed when
-- stored: they get the migration's time (a stable default, so no table rewrite), and new rows
-- get NULL once the default is dropped.
-- depends: 0016_provider_limits

ALTER TABLE messages ADD COLUMN parsed_at timestamptz DEFAULT now();
ALTER TABLE messages ALTER COLUMN parsed_at DROP DEFAULT;

-- what the parse step looks for, oldest first per mailbox (as the search indexer's)
CREATE INDEX messages_unparsed_idx ON messages (mailbox_id, id) WHERE parsed_at IS NULL;
