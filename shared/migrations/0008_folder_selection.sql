-- What became of a mailbox's folder selection at its latest listing, for `mailbox list` and
-- `mailbox folders`: each --folders name and the folder it resolved to (or none), and the enabled
-- folders that vanished without a recognised rename.
-- depends: 0007_run_progress

ALTER TABLE mailboxes ADD COLUMN folder_report jsonb NOT NULL DEFAULT '{}';
