"""Full-text search in the local store: one mailbox's messages, by words of their subject,
addresses and body (migration ``0006_search``).

The query language is the familiar web-search one, with field prefixes:

- ``invoice march``: both words (AND); ``"big invoice"``: the words in this order;
- ``march OR april``: either (``OR`` in capitals, so the French "or" stays a word; it binds
  tighter than AND: ``invoice march OR april`` is invoice AND (march OR april));
- ``-draft``, ``-"out of office"``: excluded;
- ``subject:invoice``, ``from:alice``, ``to:bob@example.com`` (To, Cc or Bcc),
  ``body:"see attached"``: only in that part of the message; ``-from:noreply`` excludes.

Words are matched whole, case- and accent-insensitively (``grusse`` finds ``Grüße``); an address
matches whole (``alice@example.com``) or by its parts (``alice``, ``example.com``). Anything else
(``&``, ``|``, ``!``, ``:*``, quotes left open, SQL) is plain text, never syntax: a query cannot
fail to parse. One whose words are all punctuation has nothing to search for and is refused, as
is one made only of exclusions (it would list the whole mailbox).

Each word is normalised by PostgreSQL itself (``phraseto_tsquery`` with the configuration the
index was built with), so the query and the index always agree on what a word is.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
import structlog

from mailferry import parsing
from mailferry.db import Connection
from mailferry.errors import ConfigError
from mailferry.mime import clean_text

log = structlog.get_logger(__name__)

CONFIG = "mailferry_search"
#: where a word was found, as weighted in ``mailferry_search_vector`` (0006_search.sql)
FIELDS = {"subject": "A", "from": "B", "to": "C", "body": "D"}
MAX_LIMIT = 1000
SNIPPET_SOURCE_CHARS = 20_000  # ts_headline parses what it is given: bound it per hit
SNIPPET_MAX_CHARS = 300
_MAX_QUERY_CHARS = 2_000
_MAX_TERMS = 64

_TOKEN = re.compile(r'\s*(-?)(?:([A-Za-z]+):)?(?:"([^"]*)"?|(\S+))')
_LEXEME = re.compile(r"'(?:[^'\\]|''|\\.)*'")


class BadQuery(ConfigError):
    """The search query cannot be used (nothing to search for, too long)."""


@dataclass(frozen=True)
class SearchHit:
    id: int
    mailbox_id: int
    sent_at: datetime | None
    from_: str | None
    to: list[str]
    subject: str | None
    folders: list[str]
    snippet: str
    rank: float


# --- indexing ----------------------------------------------------------------------------------

#: at most this many of its waiting messages a search indexes before it looks (about 1 ms each)
INDEX_ON_SEARCH = 5_000

_INDEX = """
WITH todo AS (
    SELECT id FROM messages
     WHERE search_vector IS NULL AND parsed_at IS NOT NULL
       AND (%(mailbox)s::bigint IS NULL OR mailbox_id = %(mailbox)s)
       AND (%(only)s::bigint IS NULL OR id = %(only)s)
     ORDER BY mailbox_id, id LIMIT %(limit)s
       FOR UPDATE SKIP LOCKED
)
UPDATE messages m
   SET search_vector = mailferry_search_vector(m.subject, m.from_addr, m.to_addrs, m.cc_addrs,
                                               m.bcc_addrs, m.body_text, m.body_html),
       search_head = mailferry_search_head(m.subject, m.from_addr, m.to_addrs, m.cc_addrs,
                                           m.bcc_addrs)
  FROM todo WHERE m.id = todo.id
"""


# what PostgreSQL says of text it cannot index ("string is too long for tsvector": 54000)
_NOT_INDEXABLE = (psycopg.DataError, psycopg.errors.ProgramLimitExceeded)


def index_pending(conn: Connection, *, mailbox_id: int | None = None, limit: int = 200) -> int:
    """Build the search vectors of up to ``limit`` parsed messages that have none yet (of one
    mailbox, or of any); returns how many. A message not parsed yet (shared/parsing.py) waits.
    Rows another indexer holds are skipped, not waited for.

    A message whose text PostgreSQL refuses to index (none is known: every field's prefix is
    bounded below the 1 MB tsvector limit) must not stop the others behind it forever: the
    batch is then indexed message by message, and such a message gets empty vectors (it is
    found by no search) and a warning in the log."""
    params = {"mailbox": mailbox_id, "limit": limit, "only": None}
    try:
        with conn.transaction():
            return conn.execute(_INDEX, params).rowcount
    except _NOT_INDEXABLE:
        pass
    ids = [r["id"] for r in conn.execute(
        """SELECT id FROM messages WHERE search_vector IS NULL AND parsed_at IS NOT NULL
              AND (%(mailbox)s::bigint IS NULL OR mailbox_id = %(mailbox)s)
            ORDER BY mailbox_id, id LIMIT %(limit)s""", params).fetchall()]
    for message_id in ids:
        try:
            with conn.transaction():
                conn.execute(_INDEX, {**params, "only": message_id})
        except _NOT_INDEXABLE as exc:
            log.warning("search.message_not_indexable", message_id=message_id,
                        error=exc.diag.message_primary)
            conn.execute("UPDATE messages SET search_vector = ''::tsvector, "
                         "search_head = ''::tsvector WHERE id = %s", (message_id,))
    return len(ids)


def unindexed(conn: Connection, mailbox_id: int) -> int:
    """How many of the mailbox's messages a search cannot find yet."""
    row = conn.execute("SELECT count(*) AS n FROM messages WHERE mailbox_id = %s "
                       "AND search_vector IS NULL", (mailbox_id,)).fetchone()
    return int(row["n"]) if row else 0


# --- searching ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Term:
    text: str
    field: str | None
    negated: bool


def parse_query(query: str) -> list[list[_Term]]:
    """The query as groups ANDed together, each a list of terms ORed together."""
    if len(query) > _MAX_QUERY_CHARS:
        raise BadQuery(f"the query is too long (at most {_MAX_QUERY_CHARS} characters)")
    query = clean_text(query)  # NUL and lone surrogates: PostgreSQL text cannot hold them
    groups: list[list[_Term]] = []
    pending_or = False
    for match in _TOKEN.finditer(query):
        minus, field, phrase, word = match.groups()
        if field is not None and field.lower() not in FIELDS:
            # not a field: `http://x`, `re:` or `foo:bar` are words like any other
            phrase, word = None, match.group(0).strip().removeprefix("-")
            field = None
        text = phrase if phrase is not None else word
        if text is None:
            continue
        if minus == "" and field is None and phrase is None and text == "OR":
            pending_or = bool(groups)
            continue
        term = _Term(text=text, field=field.lower() if field else None, negated=minus == "-")
        if pending_or:
            groups[-1].append(term)
        else:
            groups.append([term])
        pending_or = False
    if sum(len(g) for g in groups) > _MAX_TERMS:
        raise BadQuery(f"the query has too many terms (at most {_MAX_TERMS})")
    return groups


HEAD_FIELDS = frozenset({"subject", "from", "to"})


@dataclass(frozen=True)
class CompiledQuery:
    """The query as tsquery texts: ``full`` ranks and highlights; the matches are the messages
    whose ``search_head`` matches ``head`` (groups of header fields only, which the small
    header vector answers cheaply), whose ``search_vector`` matches ``vector``, and whose
    ``search_vector`` does not match ``excluded`` (used only when nothing else needs the big
    vector: a filter on the few candidates rather than an index scan of every message)."""

    full: str
    head: str | None
    vector: str | None
    excluded: str | None


def compile_query(conn: Connection, query: str) -> CompiledQuery:
    """Each term normalised by PostgreSQL with the index's configuration (one round trip) and
    restricted to its field's weight."""
    groups = parse_query(query)
    terms = [t for g in groups for t in g]
    normalised: list[str] = []
    if terms:
        rows = conn.execute(
            f"""SELECT phraseto_tsquery('{CONFIG}', t)::text AS q
                  FROM unnest(%s::text[]) WITH ORDINALITY AS u(t, n) ORDER BY n""",
            ([t.text for t in terms],),
        ).fetchall()
        normalised = [r["q"] for r in rows]
    by_term = dict(zip(map(id, terms), normalised, strict=True))
    full: list[str] = []
    head: list[str] = []
    vector: list[str] = []
    excluded: list[str] = []
    for group in groups:
        ored: list[str] = []
        kept = [t for t in group if by_term[id(t)]]  # punctuation only: no word to look for
        for term in kept:
            text = by_term[id(term)]
            if term.field is not None:
                text = _with_weight(text, FIELDS[term.field])
            ored.append(f"!({text})" if term.negated else f"({text})")
        if not ored:
            continue
        anded = ored[0] if len(ored) == 1 else "(" + " | ".join(ored) + ")"
        full.append(anded)
        if all(t.field in HEAD_FIELDS and not t.negated for t in kept):
            head.append(anded)
        elif len(kept) == 1 and kept[0].negated:
            excluded.append(anded[1:])
        else:
            vector.append(anded)
    if not head and not vector:
        raise BadQuery("the query has no words to search for"
                       + (" (only exclusions)" if excluded else ""))
    if vector:  # the index answers exclusions next to a word it looks up anyway
        vector += [f"!{e}" for e in excluded]
        excluded = []
    return CompiledQuery(full=" & ".join(full), head=" & ".join(head) if head else None,
                         vector=" & ".join(vector) if vector else None,
                         excluded=" | ".join(excluded) if excluded else None)


def to_tsquery_text(conn: Connection, query: str) -> str:
    """The whole query as one tsquery text (what ranks and highlights)."""
    return compile_query(conn, query).full


#: Ranking reads each candidate's stored vector (a few KB, TOASTed): only the newest this many
#: matches are ranked, so a word found in half the mailbox costs what a rarer one does.
RANK_WINDOW = 1000

# Three steps, each bounded: (1) the GIN indexes give the mailbox's matches, sorted by date
# without reading their big vectors (plain words need no recheck; weighted header terms are
# rechecked against the small header vector only); (2) in that order, the
# first RANK_WINDOW still in a folder (expunged everywhere: left out, as in `messages list`);
# (3) those ranked, and the best few described. MATERIALIZED keeps the planner from turning
# step 2 into a scan of every placement of the mailbox.
_SEARCH = f"""
WITH matches AS MATERIALIZED (
    SELECT m.id, m.sent_at FROM messages m
     WHERE m.mailbox_id = %(mailbox)s {{conditions}}
     ORDER BY m.sent_at DESC NULLS LAST, m.id DESC
), newest AS (
    SELECT x.id, x.sent_at FROM matches x
     WHERE EXISTS (SELECT 1 FROM message_folders mf
                    WHERE mf.message_id = x.id AND mf.expunged_at IS NULL
                      AND (%(folders)s::bigint[] IS NULL
                           OR mf.folder_id = ANY(%(folders)s::bigint[])))
     LIMIT {RANK_WINDOW}
), hits AS (
    SELECT x.id, x.sent_at, ts_rank(m.search_vector, %(q)s::tsquery) AS rank
      FROM newest x JOIN messages m ON m.id = x.id
     ORDER BY rank DESC, x.sent_at DESC NULLS LAST, x.id DESC
     LIMIT %(limit)s
)
SELECT h.id, m.mailbox_id, m.sent_at, m.from_addr, m.to_addrs, m.subject, h.rank,
       ARRAY(SELECT DISTINCT f.name FROM message_folders mf JOIN folders f ON f.id = mf.folder_id
              WHERE mf.message_id = h.id AND mf.expunged_at IS NULL ORDER BY f.name) AS folders,
       ts_headline('{CONFIG}',
                   CASE WHEN m.body_text IS NOT NULL THEN left(m.body_text, {SNIPPET_SOURCE_CHARS})
                        ELSE regexp_replace(left(coalesce(m.body_html, ''), {SNIPPET_SOURCE_CHARS}),
                                            '<[^>]*>', ' ', 'g') END,
                   %(q)s::tsquery,
                   'MaxFragments=2, MinWords=5, MaxWords=15, StartSel=**, StopSel=**, '
                   'FragmentDelimiter=" ... "') AS snippet
  FROM hits h JOIN messages m ON m.id = h.id
 ORDER BY h.rank DESC, h.sent_at DESC NULLS LAST, h.id DESC
"""


def search_sql(compiled: CompiledQuery) -> str:
    """The search statement for this query's parts (fixed fragments only: every value the
    user typed is a bound parameter)."""
    conditions = ""
    if compiled.head is not None:
        conditions += " AND m.search_head @@ %(head)s::tsquery"
    if compiled.vector is not None:
        conditions += " AND m.search_vector @@ %(vector)s::tsquery"
    if compiled.excluded is not None:
        conditions += " AND NOT (m.search_vector @@ %(excluded)s::tsquery)"
    return _SEARCH.replace("{conditions}", conditions)


def search_messages(conn: Connection, mailbox_id: int, query: str, *, limit: int = 20,
                    folder: str | None = None) -> list[SearchHit]:
    """The mailbox's messages matching ``query``, best first: by rank, then newest. When more
    than RANK_WINDOW messages match, the newest RANK_WINDOW of them are the ones ranked.

    The mailbox's messages still waiting for the background parse step and indexer are parsed
    and indexed first (up to INDEX_ON_SEARCH of them: ``unindexed`` tells whether some are left
    out).

    Always scoped to one mailbox: its id is in the WHERE clause, so no other mailbox's mail can
    appear. Only messages still in a folder (not expunged everywhere) are returned, like
    ``messages list``; ``folders`` lists where they are now. An unknown folder finds nothing.
    """
    if not 1 <= limit <= MAX_LIMIT:
        raise BadQuery(f"the limit must be between 1 and {MAX_LIMIT}")
    compiled = compile_query(conn, query)
    # What the background steps have not reached yet (just synced mail), searchable now.
    budget = INDEX_ON_SEARCH
    while budget > 0:
        batch = min(500, budget)
        budget -= batch
        parsed = parsing.parse_pending(conn, mailbox_id=mailbox_id, limit=batch)
        if index_pending(conn, mailbox_id=mailbox_id, limit=batch) < batch and parsed < batch:
            break
    folders: list[int] | None = None
    if folder is not None:
        folder = clean_text(folder)
        folders = [r["id"] for r in conn.execute(
            "SELECT id FROM folders WHERE mailbox_id = %s AND (name = %s OR raw_name = %s)",
            (mailbox_id, folder, folder)).fetchall()]
        if not folders:
            return []
    params: dict[str, Any] = {"q": compiled.full, "head": compiled.head,
                              "vector": compiled.vector, "excluded": compiled.excluded,
                              "mailbox": mailbox_id, "folders": folders, "limit": limit}
    try:
        with conn.transaction():
            # The planner prices a row's `@@` as cheap, but it reads (and decompresses) a
            # vector of a few KB: with sequential scans allowed it would check every message of
            # the mailbox rather than ask the index (1 s instead of 0.1 s at 100,000 messages).
            conn.execute("SET LOCAL enable_seqscan = off")
            rows = conn.execute(search_sql(compiled), params).fetchall()
    except (psycopg.errors.SyntaxError, psycopg.DataError) as exc:
        # should not happen (the terms come back from PostgreSQL itself); say it in one line
        raise BadQuery(f"cannot search for {query!r}: {exc.diag.message_primary}") from exc
    return [
        SearchHit(id=r["id"], mailbox_id=r["mailbox_id"], sent_at=r["sent_at"],
                  from_=r["from_addr"], to=list(r["to_addrs"]), subject=r["subject"],
                  folders=list(r["folders"]), snippet=_clip(r["snippet"] or ""),
                  rank=float(r["rank"]))
        for r in rows
    ]


def _with_weight(tsquery: str, weight: str) -> str:
    """``'a' <-> 'b'`` -> ``'a':A <-> 'b':A``: each lexeme only where the field put it."""
    return _LEXEME.sub(lambda m: f"{m.group(0)}:{weight}", tsquery)


def _clip(snippet: str) -> str:
    snippet = " ".join(snippet.split())
    return snippet if len(snippet) <= SNIPPET_MAX_CHARS else snippet[:SNIPPET_MAX_CHARS - 3] + "..."
