-- Full-text search over the local store (`mailferry messages search`, shared/search.py).
--
-- Mail is multilingual, so no language's stemming or stop words: the `simple` configuration
-- (lower-casing only), with accents folded by `unaccent` for words that are not plain ASCII, so
-- "Grüße" finds "GRÜSSE" and "grusse", and "cafe" finds "Café". The same configuration reads
-- the documents and the queries, so both sides fold alike.
--
-- Each message's vectors are stored rather than only indexed as expressions, because ranking
-- and phrase checks read them for every match; recomputing them from the bodies then would cost
-- more than the search. Weights say where a word was found, and `subject:`, `from:`, `to:` and
-- `body:` in a query select them: A subject, B from, C to/cc/bcc, D body. Ranking follows.
--
-- The vectors are filled after the insert, not by it: building them costs about 1 ms of
-- PostgreSQL time per message (mostly parsing the body), as much again as storing it, and an
-- initial sync must not wait for that. A new message's vectors are NULL until the persister's
-- background indexer (services/persister/indexer.py) fills them, which it does when its queue
-- is quiet or the oldest waiting message has waited a minute; a search first indexes what its
-- mailbox still has waiting (shared/search.py). The partial index finds the waiting rows.
--
-- Bounded inputs: a tsvector holds at most 1 MB, so only a prefix of each field is indexed (the
-- first 100,000 characters of the body; words beyond it are not found). Words of more than
-- 2,047 characters are skipped by PostgreSQL itself.
--
-- The GIN indexes lead with the mailbox (btree_gin), because every search is scoped to one
-- mailbox: a common word costs what it costs in that mailbox, not in the whole store.
--
-- About 5 KB of vectors per message (bench/search.py, bench/README.md). unaccent and btree_gin
-- ship with PostgreSQL (contrib) and are trusted extensions: the database's owner may create
-- them.
-- depends: 0005_run_kinds

CREATE EXTENSION IF NOT EXISTS unaccent;
CREATE EXTENSION IF NOT EXISTS btree_gin;

CREATE TEXT SEARCH CONFIGURATION mailferry_search (COPY = simple);
-- asciiword/asciihword have no accents to fold: they skip the unaccent lookup.
ALTER TEXT SEARCH CONFIGURATION mailferry_search
    ALTER MAPPING FOR word, hword, hword_part WITH unaccent, simple;

-- An address is indexed whole (alice.martin@example.com) and by its parts (alice.martin,
-- example.com; without the brackets, which would make `<alice example.com>` an HTML tag to the
-- parser), with the display name's words. array_to_string is only "stable" in general
-- (element types' output functions); for text[] it is immutable, as these wrappers declare.
-- The SQL-standard bodies bind the configuration and functions at creation, not by search_path.
CREATE FUNCTION mailferry_search_head(subject text, from_addr text, to_addrs text[],
                                      cc_addrs text[], bcc_addrs text[])
    RETURNS tsvector
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN
    setweight(to_tsvector('mailferry_search'::regconfig, left(coalesce(subject, ''), 10000)), 'A')
    || setweight(to_tsvector('mailferry_search'::regconfig,
                             left(coalesce(from_addr, '') || ' '
                                  || translate(coalesce(from_addr, ''), '@<>', '   '), 10000)), 'B')
    || setweight(to_tsvector('mailferry_search'::regconfig,
                             left(array_to_string(to_addrs || cc_addrs || bcc_addrs, ' ') || ' '
                                  || translate(array_to_string(to_addrs || cc_addrs || bcc_addrs, ' '),
                                               '@<>', '   '), 40000)), 'C');

-- the HTML body only when there is no text body; its tags are not words to the parser
CREATE FUNCTION mailferry_search_vector(subject text, from_addr text, to_addrs text[],
                                        cc_addrs text[], bcc_addrs text[], body_text text,
                                        body_html text)
    RETURNS tsvector
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN
    mailferry_search_head(subject, from_addr, to_addrs, cc_addrs, bcc_addrs)
    || setweight(to_tsvector('mailferry_search'::regconfig,
                             left(coalesce(body_text, body_html, ''), 100000)), 'D');

-- Everything, for plain words, phrases and ranking.
ALTER TABLE messages ADD COLUMN search_vector tsvector;
ALTER TABLE messages ALTER COLUMN search_vector SET COMPRESSION lz4;  -- as the bodies (0002)

-- The headers alone, for `subject:`, `from:` and `to:`. GIN keeps no weights, so a weighted
-- term is rechecked against each candidate's vector: a few hundred bytes here, stored inline,
-- rather than the whole message's few TOASTed kilobytes.
ALTER TABLE messages ADD COLUMN search_head tsvector;

CREATE INDEX messages_search_idx ON messages USING gin (mailbox_id, search_vector);
CREATE INDEX messages_search_head_idx ON messages USING gin (mailbox_id, search_head);
-- the messages waiting for their vectors (existing ones included: all of them, at first)
CREATE INDEX messages_unindexed_idx ON messages (mailbox_id, id) WHERE search_vector IS NULL;
