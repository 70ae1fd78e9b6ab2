-- A mailbox being removed (`mailferry mailbox remove`, shared/app/removal.py): set first, in the
-- same transaction that fences off its fetcher, so that the scheduler, the fetcher and the
-- persister leave it alone while its data is deleted in chunks, and an interrupted removal
-- is found and finished by running it again.
-- depends: 0008_folder_selection

ALTER TABLE mailboxes ADD COLUMN removing_at timestamptz;

-- Removing a mailbox deletes the raw bytes no other mailbox's messages reference: that question
-- is asked by hash, and (mailbox_id, sha256) cannot answer it without reading every mailbox.
CREATE INDEX messages_sha256_idx ON messages (sha256);
