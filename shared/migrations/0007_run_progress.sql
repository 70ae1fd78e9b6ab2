-- What `mailferry sync --wait` draws its progress bar from: the fetcher's attempt (its fencing
-- token) records how many folders it will sync and, folder by folder, how many messages it found
-- to fetch; the persister's stored batches of that same attempt are the progress.
-- depends: 0006_search

ALTER TABLE sync_runs
    ADD COLUMN progress_token  bigint,
    ADD COLUMN folders_total   integer,
    ADD COLUMN messages_found  integer NOT NULL DEFAULT 0;
