-- Raw messages compress with lz4 as PostgreSQL stores them (they were stored uncompressed,
-- STORAGE EXTERNAL): less disk, WAL included (bench/initial_sync.py: 644 -> 574 MB of database
-- for 20,000 messages whose attachments are random bytes; real mail compresses far better),
-- for no measurable time. What does not compress (base64 of compressed attachments)
-- PostgreSQL keeps as it is. Rows stored before stay as they are; the bytes read back are the
-- same.
-- depends: 0001_initial

ALTER TABLE raw_messages
    ALTER COLUMN data SET STORAGE EXTENDED,
    ALTER COLUMN data SET COMPRESSION lz4;
