-- Flags carry the fencing token of the attempt that read them: a flag update applies only if it
-- comes from the same or a newer attempt, so a late event can never roll flags back.
-- depends: 0003_notifications

ALTER TABLE message_folders ADD COLUMN flags_token bigint;
