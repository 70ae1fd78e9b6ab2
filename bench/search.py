"""Benchmark: full-text search in the local store, and what its index costs the persister.

Why this exists: `mailferry messages search` promises answers in milliseconds on a mailbox of
100,000 messages (migration 0006_search: stored, weighted tsvectors per message, of everything
and of the headers only, each with a GIN index led by mailbox_id). They are built after the
insert, by the persisters' background indexer, so what the insert path still pays and what the
indexing costs are measured too.

This is a report, not a test: it prints figures and one JSON line with them, and fails only when
a result is wrong (a query whose hits are not what the seeding planted), never because it is slow.

What it does:

1. **Search.** Creates a private database (migrated), and seeds one mailbox with N messages
   (default 100,000) and a second mailbox with N/10, with COPY: synthetic but realistic mail,
   subjects and bodies drawn from a 50,000-word vocabulary with a Zipf distribution (s = 1,
   some words accented), bodies log-normal around 400 words (about 3 KB), senders and
   recipients from a pool of 2,000 people (also Zipf), a planted phrase in 1% of bodies. Then it
   runs a set of queries (rare, medium and common words, a phrase, OR, a negation, an address,
   field prefixes, no hit) ``--runs`` times each through ``shared.search.search_messages``
   (what the CLI runs, minus Python's start-up) and prints p50 / p95 latencies, the number of
   matches and the plan's scan nodes (to show the index is used). The seeded messages are
   indexed first with ``shared.search.index_pending`` (the background indexer's step), timed.
2. **Insert cost** (``--insert-messages``, default 2,000; 0 skips it). Generates realistic
   MIME messages with bench/initial_sync.py's factory, parses them (untimed), and times the
   persister's own ``store.store_messages`` in batches of 500, one commit each, into two
   databases: as migrated, and with the search columns dropped (the schema before 0006); then,
   as migrated, the deferred indexing of what was stored (``index_pending``, 200 at a time, as
   the indexer does). Rounds alternate the order; medians are reported.

Run it with ``.venv/bin/python bench/search.py`` (about 3 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import random
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from mailferry import db, search
from mailferry.devkit import services
from mailferry.devkit.mail import MessageFactory
from mailferry.devkit.measure import machine
from mailferry.messages import FetchedMessage
from mailferry.mime import parse_message
from mailferry.search import compile_query, search_messages, search_sql
from mailferry.services.persister import store

REPO = Path(__file__).resolve().parents[1]

VOCABULARY = 50_000
PEOPLE = 2_000
PHRASE = "quarterly report"
_SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "ta", "be", "so", "vi", "da", "po", "ge", "fa", "zu",
              "ri", "mo", "che", "lan", "tor", "vel", "mar", "sin", "dor", "pel", "qui", "bra",
              "sté", "gré", "über", "ña", "ço", "ør"]
_FIRST = ["Alice", "Bob", "Carol", "Dave", "Eve", "Frank", "Grace", "Heidi", "Ivan", "Judy",
          "Jürgen", "Zoé", "Łukasz", "Søren", "Amélie", "Noah", "Mia", "Liam", "Olga", "Raj"]
_LAST = ["Martin", "Smith", "Dubois", "Müller", "Rossi", "García", "Novák", "Kowalski",
         "Andersen", "Schmidt", "Bernard", "Lefèvre", "Silva", "Nakamura", "Ivanov", "Brown"]
_DOMAINS = ["example.com", "example.org", "mail.example.net", "beispiel.de", "exemple.fr",
            "corp.example.com", "lists.example.org"]


class Zipf:
    """Draws indexes 0..n-1 with probability proportional to 1 / (rank ** s)."""

    def __init__(self, n: int, s: float = 1.0) -> None:
        weights = [1.0 / (rank ** s) for rank in range(1, n + 1)]
        total = 0.0
        self.cumulative: list[float] = []
        for w in weights:
            total += w
            self.cumulative.append(total)
        self.population = range(n)

    def draw(self, rng: random.Random, k: int) -> list[int]:
        return rng.choices(self.population, cum_weights=self.cumulative, k=k)


def vocabulary(rng: random.Random) -> list[str]:
    words: set[str] = set()
    ordered: list[str] = []
    while len(ordered) < VOCABULARY:
        word = "".join(rng.choice(_SYLLABLES) for _ in range(rng.choice((2, 2, 3, 3, 3, 4))))
        if word not in words:
            words.add(word)
            ordered.append(word)
    return ordered


def people(rng: random.Random) -> list[str]:
    out = []
    for i in range(PEOPLE):
        first, last = rng.choice(_FIRST), rng.choice(_LAST)
        local = f"{first}.{last}".lower().encode("ascii", "ignore").decode() or "someone"
        out.append(f"{first} {last} <{local}{i}@{rng.choice(_DOMAINS)}>")
    return out


# --- seeding ----------------------------------------------------------------------------------


def _copy_text(value: Any) -> str:
    """One field in COPY's text format."""
    if value is None:
        return "\\N"
    if isinstance(value, list):
        inner = ",".join('"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"' for v in value)
        value = "{" + inner + "}"
    text = str(value)
    return (text.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n")
            .replace("\r", "\\r"))


def seed_mailbox(conn: db.Connection, mailbox_id: int, count: int, first_id: int,
                 rng: random.Random, words: list[str], who: list[str]) -> None:
    """COPY ``count`` synthetic messages (ids from ``first_id``) into the mailbox's INBOX."""
    folder = store.folder_id(conn, mailbox_id, "INBOX")
    word_zipf, people_zipf = Zipf(len(words)), Zipf(len(who), 0.8)
    now = datetime(2026, 11, 1, tzinfo=UTC)
    chunk = 5_000
    for start in range(0, count, chunk):
        n = min(chunk, count - start)
        raw, messages, placements = io.StringIO(), io.StringIO(), io.StringIO()
        for i in range(start, start + n):
            mid = first_id + i
            subject = " ".join(words[w] for w in word_zipf.draw(rng, rng.randint(3, 8)))
            if rng.random() < 0.3:
                subject = "Re: " + subject
            length = int(min(max(rng.lognormvariate(math.log(400), 0.6), 40), 4000))
            body_words = [words[w] for w in word_zipf.draw(rng, length)]
            if rng.random() < 0.01:
                body_words.insert(rng.randrange(len(body_words)), PHRASE)
            lines = [" ".join(body_words[j:j + 12]) for j in range(0, len(body_words), 12)]
            body = "\n".join(lines)
            sender, *rcpt = (who[p] for p in people_zipf.draw(rng, rng.randint(2, 6)))
            to, cc = rcpt[:2], rcpt[2:]
            sha = mid.to_bytes(32, "big")
            sent = now - timedelta(seconds=rng.uniform(0, 365 * 86400))
            raw.write(f"\\\\x{sha.hex()}\t{len(body)}\t\\\\x00\n")
            messages.write("\t".join(_copy_text(v) for v in (
                mid, mailbox_id, "\\x" + sha.hex(), len(body), f"<{mid}@bench>", subject,
                sender, to, cc, sent.isoformat(), body)) + "\n")
            placements.write(f"{folder}\t1\t{i + 1}\t{mid}\t{sent.isoformat()}\t{len(body)}\n")
        with conn.transaction(), conn.cursor() as cur:
            for sql, data in (
                ("COPY raw_messages (sha256, size, data) FROM STDIN", raw),
                ("COPY messages (id, mailbox_id, sha256, size, message_id, subject, from_addr,"
                 " to_addrs, cc_addrs, sent_at, body_text) FROM STDIN", messages),
                ("COPY message_folders (folder_id, uidvalidity, uid, message_id, internal_date,"
                 " size) FROM STDIN", placements),
            ):
                with cur.copy(sql) as copy:
                    copy.write(data.getvalue())
        print(f"\r  mailbox {mailbox_id}: {start + n:,} / {count:,} messages", end="", flush=True)
    print()


def _mailbox(conn: db.Connection, name: str) -> int:
    row = conn.execute(
        """INSERT INTO mailboxes (name, host, port, security, username, password_encrypted)
           VALUES (%s, 'imap.example.com', 993, 'ssl', 'u', '\\x00') RETURNING id""",
        (name,),
    ).fetchone()
    assert row is not None
    return int(row["id"])


# --- searching --------------------------------------------------------------------------------


def queries(words: list[str], who: list[str]) -> list[tuple[str, str]]:
    address = who[3].split("<")[1].rstrip(">")
    return [
        ("rare word", words[40_000]),
        ("medium word", words[300]),
        ("common word", words[4]),
        ("two words", f"{words[300]} {words[700]}"),
        ("phrase", f'"{PHRASE}"'),
        ("OR", f"{words[40_000]} OR {words[41_000]}"),
        ("negation", f"{words[300]} -{words[30]}"),
        ("address", address),
        ("from: an address", f"from:{address}"),
        ("subject: a word", f"subject:{words[1_000]}"),
        ("accented, any case", words[next(i for i in range(200, 2000) if not words[i].isascii())]
         .upper()),
        ("no hit", "zzznotaword"),
    ]


def _scan_nodes(plan: dict[str, Any]) -> Iterator[str]:
    node = plan["Node Type"]
    if "Scan" in node:
        target = plan.get("Index Name") or plan.get("Relation Name") or plan.get("Alias", "")
        yield f"{node} on {target}"
    for child in plan.get("Plans", []):
        yield from _scan_nodes(child)


def explain(conn: db.Connection, mailbox_id: int, query: str) -> dict[str, Any]:
    compiled = compile_query(conn, query)
    params = {"q": compiled.full, "head": compiled.head, "vector": compiled.vector,
              "excluded": compiled.excluded, "mailbox": mailbox_id, "folders": None, "limit": 20}
    with conn.transaction():
        conn.execute("SET LOCAL enable_seqscan = off")  # as search_messages does
        row = conn.execute("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + search_sql(compiled),
                           params).fetchone()
    assert row is not None
    plan = row["QUERY PLAN"][0]
    nodes = list(dict.fromkeys(_scan_nodes(plan["Plan"])))
    count = conn.execute(
        "SELECT count(*) AS n FROM messages WHERE mailbox_id = %s AND search_vector @@ %s::tsquery",
        (mailbox_id, compiled.full),
    ).fetchone()
    assert count is not None
    return {"tsquery": compiled.full, "matches": count["n"], "scans": nodes,
            "execution_ms": round(plan["Execution Time"], 2)}


def timed(fn: Callable[[], object], runs: int) -> list[float]:
    fn()  # warm the cache: the figures are for a mailbox in use, not a cold start
    out = []
    for _ in range(runs):
        started = time.perf_counter()
        fn()
        out.append((time.perf_counter() - started) * 1000)
    return out


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(p * len(ordered)) - 1)]


def run_search(args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    words, who = vocabulary(rng), people(rng)
    with services.private_database() as url:
        db.migrate(url)
        conn = db.connect(url, autocommit=True)
        mine, other = _mailbox(conn, "bench"), _mailbox(conn, "other")
        started = time.perf_counter()
        seed_mailbox(conn, mine, args.messages, 1, rng, words, who)
        seed_mailbox(conn, other, args.messages // 10, args.messages + 1, rng, words, who)
        seed_seconds = time.perf_counter() - started
        started = time.perf_counter()
        while search.index_pending(conn, limit=1000):
            pass
        index_seconds = time.perf_counter() - started
        total = args.messages + args.messages // 10
        print(f"  indexed {total:,} messages in {index_seconds:.1f} s "
              f"({index_seconds / total * 1000:.2f} ms per message)")
        conn.execute("VACUUM ANALYZE messages")
        conn.execute("VACUUM ANALYZE message_folders")
        sizes = conn.execute(
            """SELECT pg_size_pretty(pg_relation_size('messages_search_idx')) AS index,
                      pg_size_pretty(pg_total_relation_size('messages')) AS messages_total,
                      pg_size_pretty(pg_relation_size('messages_search_head_idx'))
                          AS head_index,
                      (SELECT pg_size_pretty(sum(pg_column_size(search_vector)))
                         FROM messages) AS search_vectors,
                      (SELECT pg_size_pretty(sum(pg_column_size(search_head)))
                         FROM messages) AS search_heads,
                      (SELECT pg_size_pretty(sum(pg_column_size(body_text)))
                         FROM messages) AS bodies""").fetchone()
        results = []
        for name, query in queries(words, who):
            hits = search_messages(conn, mine, query)
            latencies = timed(lambda q=query: search_messages(conn, mine, q), args.runs)
            info = explain(conn, mine, query)
            if name == "no hit":
                assert hits == [] and info["matches"] == 0, "a made-up word matched"
            elif name != "negation":
                assert hits, f"{name}: {query!r} found nothing"
            assert all(h.mailbox_id == mine for h in hits), "another mailbox's message leaked"
            results.append({"name": name, "query": query, "hits": len(hits), **info,
                            "p50_ms": round(statistics.median(latencies), 2),
                            "p95_ms": round(percentile(latencies, 0.95), 2),
                            "max_ms": round(max(latencies), 2)})
            print(f"  {name:22} {results[-1]['p50_ms']:8.1f} ms p50 "
                  f"{results[-1]['p95_ms']:8.1f} ms p95  {info['matches']:>7,} matches  "
                  f"{', '.join(info['scans'])}")
        conn.close()
    return {"messages": args.messages, "other_mailbox": args.messages // 10,
            "seed_seconds": round(seed_seconds, 1), "index_seconds": round(index_seconds, 1),
            "sizes": sizes, "queries": results}


# --- insert cost ------------------------------------------------------------------------------


def run_insert_cost(args: argparse.Namespace) -> dict[str, Any]:
    factory = MessageFactory(args.seed, datetime.now(UTC))
    incoming = []
    total_bytes = 0
    for uid in range(1, args.insert_messages + 1):
        raw = factory.message(uid)[0]
        total_bytes += len(raw)
        fetched = FetchedMessage(uid=uid, size=len(raw), raw=raw)
        incoming.append(store.Incoming(fetched=fetched, sha256=store.sha256(raw),
                                       parsed=parse_message(raw)))
    batches = [incoming[i:i + 500] for i in range(0, len(incoming), 500)]
    # the schema before 0006, and as migrated (the vectors left for the indexer)
    variants = {"without (before 0006)": "ALTER TABLE messages DROP COLUMN search_vector, "
                                         "DROP COLUMN search_head",
                "as migrated": None}
    timings: dict[str, list[float]] = {name: [] for name in variants}
    timings["deferred indexing"] = []
    with contextlib.ExitStack() as stack:
        conns = {}
        for name, ddl in variants.items():
            url = stack.enter_context(services.private_database())
            db.migrate(url)
            conns[name] = db.connect(url, autocommit=True)
            stack.callback(conns[name].close)
            if ddl:
                conns[name].execute(ddl)
        for round_no in range(args.insert_rounds):
            order = list(conns.items())
            if round_no % 2:
                order.reverse()
            for name, conn in order:
                conn.execute("TRUNCATE message_folders, messages, raw_messages, folders, "
                             "mailboxes CASCADE")
                conn.execute("CHECKPOINT")
                mailbox_id = _mailbox(conn, "insert")
                folder = store.folder_id(conn, mailbox_id, "INBOX")
                started = time.perf_counter()
                for batch in batches:
                    with conn.transaction():
                        store.store_messages(conn, mailbox_id, folder, 1, batch, token=0)
                timings[name].append(time.perf_counter() - started)
                if name == "as migrated":
                    started = time.perf_counter()
                    while search.index_pending(conn, limit=200):
                        pass
                    timings["deferred indexing"].append(time.perf_counter() - started)
    n = args.insert_messages
    base = statistics.median(timings["without (before 0006)"])
    result: dict[str, Any] = {"messages": n, "mb": round(total_bytes / 1e6, 1),
                              "rounds": args.insert_rounds, "variants": {}}
    print(f"  store_messages, {n:,} messages ({result['mb']} MB) in batches of 500, "
          f"median of {args.insert_rounds} rounds:")
    for name, values in timings.items():
        median = statistics.median(values)
        result["variants"][name] = {
            "seconds": [round(t, 3) for t in values],
            "ms_per_message": round(median / n * 1000, 3),
            "extra_ms_per_message": round((median - base) / n * 1000, 3),
            "ratio": round(median / base, 2)}
        v = result["variants"][name]
        versus = (f"(+{v['extra_ms_per_message']} ms, x{v['ratio']})"
                  if name != "deferred indexing" else "(later, in the background)")
        print(f"    {name:24} {v['ms_per_message']:6.3f} ms/message {versus}; "
              f"rounds {v['seconds']} s")
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=30, help="timed runs per query")
    parser.add_argument("--insert-messages", type=int, default=2_000)
    parser.add_argument("--insert-rounds", type=int, default=4)
    parser.add_argument("--seed", type=int, default=1)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    host = machine()
    print(f"machine: {host}")
    report: dict[str, Any] = {"machine": host, "date": datetime.now(UTC).isoformat(
        timespec="seconds")}
    if args.insert_messages:
        print("insert cost:")
        report["insert"] = run_insert_cost(args)
    if args.messages:
        print(f"search, {args.messages:,} messages:")
        report["search"] = run_search(args)
        print(f"  seeded in {report['search']['seed_seconds']} s; sizes: {report['search']['sizes']}")
    print(json.dumps(report, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
