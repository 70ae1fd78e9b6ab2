-- Message bodies and attachment lists compress with lz4 rather than pglz: about three times
-- cheaper to write (measured with bench/initial_sync.py), for a little more disk.
-- depends: 0001_initial

ALTER TABLE messages
    ALTER COLUMN body_text SET COMPRESSION lz4,
    ALTER COLUMN body_html SET COMPRESSION lz4,
    ALTER COLUMN attachments SET COMPRESSION lz4;
