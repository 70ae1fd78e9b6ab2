-- Raw messages compress with lz4 as PostgreSQL stores them (they were stored uncompressed,
-- STORAGE EXTERNAL): less to write to the WAL and the table during a first sync, which is
-- what the persister waits on (issue 11, bench/initial_sync.py). Mail is mostly text; what
-- does not compress (base64 of compressed attachments) PostgreSQL keeps as it is. Rows stored
-- before stay as they are; the bytes read back are the same.
-- depends: 0001_initial

ALTER TABLE raw_messages
    ALTER COLUMN data SET STORAGE EXTENDED,
    ALTER COLUMN data SET COMPRESSION lz4;
