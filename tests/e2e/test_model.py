"""Model-based test of sync convergence (DESIGN invariants 2, 6, 7) against a real Dovecot.

A hypothesis ``RuleBasedStateMachine`` starts each example with a fresh IMAP user holding some
mail in INBOX and Work, a fresh mailbox (``mailferry mailbox add ... --folders INBOX,Work``) and
its first sync, then changes the server at random over IMAP - APPEND (messages from a small pool,
so bytes are often shared, with random flags), flags added and removed (\\Seen, \\Flagged,
\\Answered, \\Draft, $Label1), EXPUNGE, MOVE, COPY (also into the same folder), CREATE, RENAME
and DELETE of folders (flat names, one of them non-ASCII, one with a space), a UIDVALIDITY reset
(the folder deleted and made anew with the same messages, flags and INTERNALDATEs) - and the
user's selection (``mailferry mailbox folders ID --enable/--disable NAME``, which lists the
folders at once), interleaved with ``mailferry sync --mailbox ID --wait --json`` while a fetcher
and a persister run as processes. After every sync:

* the store equals the server for the enabled folders: (folder, uid) -> (sha256 of BODY[],
  sorted flags without \\Recent), read with ``mailferry messages list --json``; a disabled folder
  keeps the mail as last synced, a folder kept after its deletion on the server too;
* the folders (``mailferry mailbox folders ID --json``: sync_enabled, gone_at, message count)
  follow the product's rules: a folder appearing later is enabled only if the ``--folders``
  selection names it; a folder deleted on the server is kept with ``gone_at`` set if it holds
  synced mail and is gone otherwise; a rename is recognized by the UIDVALIDITY the folder keeps
  (only when the old name vanished), or, for a vanished enabled folder, by the one new folder
  holding its newest stored Message-IDs (a new UIDVALIDITY: Courier, or a rename and a re-creation
  between two syncs), and keeps the folder's row, settings and mail, synced under its new name
  by that very sync - or, while the persister has no rename detection (no "rename" in
  ``store.upsert_folders``), is a deletion plus a new folder;
* a sync after no change fetches nothing (invariant 6: ``messages_stored`` is 0);
* no raw bytes are stored twice: ``raw_messages`` holds exactly what it held before the example
  plus each distinct sha256 synced into the mailbox, ``messages`` one row per distinct sha256.

The server is the oracle (read back over IMAP before each sync); the model is what the store
must hold. Dovecot, the database, the vhost and the services start once per test function;
examples are independent (fresh user and mailbox each). When an example ends without a failure,
``teardown`` syncs and checks once more (a failure there shows as ``state.teardown()``).
Both server modes run: CONDSTORE/QRESYNC announced, and hidden
(``Dovecot(..., capabilities_hidden=("CONDSTORE", "QRESYNC"))``).

Running it::

    .venv/bin/pytest -q tests/e2e/test_model.py                      # CI profile: 4 x 12 steps
    MAILFERRY_MODEL_PROFILE=long .venv/bin/pytest -q tests/e2e/test_model.py
    .venv/bin/pytest -q -m slow tests/e2e/test_model.py              # the long profile, marked slow

The default profile takes about 50 s per mode; the long one (30 examples of up to 40 steps per
mode) 10-20 minutes per mode. A failure is shrunk to a minimal sequence of steps (shrinking
replays examples, so a failing run takes minutes); ``@reproduce_failure`` in the report replays it.
"""

from __future__ import annotations

import hashlib
import inspect
import itertools
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    precondition,
    rule,
    run_state_machine_as_test,
)
from imapclient import IMAPClient

from mailferry import db
from mailferry.devkit import services
from mailferry.devkit.dovecot import Dovecot
from mailferry.services.fetcher.planning import RENAME_SAMPLE
from mailferry.services.persister import store as persister_store

PROFILES: dict[str, dict[str, int]] = {
    "default": {"max_examples": 4, "stateful_step_count": 12},
    "long": {"max_examples": 30, "stateful_step_count": 40},
}
PROFILE = os.environ.get("MAILFERRY_MODEL_PROFILE", "default")
if PROFILE not in PROFILES:
    raise ValueError(f"MAILFERRY_MODEL_PROFILE must be one of {sorted(PROFILES)}, not {PROFILE!r}")

INITIAL_FOLDERS = ("INBOX", "Work")  # the --folders selection at `mailbox add`
# Folders the machine creates; "Work" is in the selection, so it is enabled when (re)discovered.
FOLDER_NAMES = ("Work", "Archive", "Résumé", "Lists 2024")
FLAGS = ("\\Seen", "\\Flagged", "\\Answered", "\\Draft", "$Label1")
# Whether the product recognizes renamed folders (read from its source): a rename then keeps
# the folder's row; without it a rename is a deletion plus a new (disabled) folder.
RENAMES_DETECTED = "rename" in inspect.getsource(persister_store.upsert_folders).lower()

Snapshot = dict[int, tuple[str, tuple[str, ...]]]  # uid -> (sha256 of BODY[], sorted flags)
State = dict[tuple[str, int], tuple[str, tuple[str, ...]]]  # (folder, uid) -> same


def message(k: int) -> bytes:
    """Message number k of a small pool: the same k gives the same bytes (shared content)."""
    if k % 5 == 4:  # bare LF line endings and 8-bit UTF-8 in a header and the body
        return f"Subject: ünïcode {k}\nMessage-ID: <{k}@model>\n\nbody {k} é\n".encode()
    lines = "".join(f"line {i} of {k}\r\n" for i in range(k % 7))
    return f"Subject: note {k}\r\nMessage-ID: <{k}@model>\r\n\r\nbody {k}\r\n{lines}".encode()


def _sha(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()


def _flags(raw_flags: Any) -> tuple[str, ...]:
    return tuple(sorted(f.decode() if isinstance(f, bytes) else str(f) for f in raw_flags
                        if f not in (b"\\Recent", "\\Recent")))


@dataclass
class Context:
    """What lives as long as one test function: the deployment and what it stored so far."""

    server: Dovecot
    env: dict[str, str]
    conn: db.Connection
    processes: services.ServiceProcesses
    owner: str  # the user owning every example's mailbox
    counter: Iterator[int] = field(default_factory=itertools.count)


@dataclass
class Row:
    """A folder row of the store as the model expects it."""

    enabled: bool
    gone: bool = False
    uidvalidity: int | None = None  # the generation last synced (None: never synced)
    messages: Snapshot = field(default_factory=dict)  # live placements as last synced


@dataclass
class ServerFolder:
    uidvalidity: int
    messages: Snapshot


class SyncModel(RuleBasedStateMachine):
    """The server is the oracle; the model is what the store must hold after each sync."""

    def __init__(self, ctx: Context) -> None:
        super().__init__()
        self.ctx = ctx
        n = next(ctx.counter)
        self.user = f"model{n}"
        ctx.server.add_user(self.user, "pw")
        with self._imap() as imap:
            imap.create_folder("Work")
        added = self._cli(["mailbox", "add", "--owner", ctx.owner, "--host", ctx.server.host,
                           "--port", str(ctx.server.port), "--security", "none",
                           "--username", self.user, "--password-stdin",
                           "--folders", ",".join(INITIAL_FOLDERS)], stdin=b"pw\n")
        self.mailbox_id = int(added["id"])
        self.counts: dict[str, int] = {"INBOX": 0, "Work": 0}  # messages per server folder
        self.rows: dict[str, Row] = {}  # the store's folders, as the model expects them
        self.hashes: set[str] = set()  # every sha256 synced into this mailbox
        self.message_ids: dict[str, str] = {}  # sha256 -> Message-ID, of what the server held
        # raw_messages is shared by all mailboxes: what earlier examples left in it
        self.raw_before = {bytes(r["sha256"]).hex() for r in ctx.conn.execute(
            "SELECT sha256 FROM raw_messages").fetchall()}
        self.dirty = True  # changed since the last sync
        self.changes = 0
        self.sync_every = 1

    # -- helpers -----------------------------------------------------------------------------

    def _imap(self) -> Any:
        return self.ctx.server.session(self.user)

    def _cli(self, args: list[str], stdin: bytes | None = None) -> Any:
        result = services.run_cli(args, self.ctx.env, stdin=stdin)
        assert result.returncode == 0, (
            f"mailferry {' '.join(args)} exited {result.returncode}:\n"
            f"{result.stderr.decode()}{result.stdout.decode()}")
        return json.loads(result.stdout) if result.stdout.strip() else None

    def _folders(self, nonempty: bool = False, inbox: bool = True) -> list[str]:
        return sorted(f for f, n in self.counts.items()
                      if (n or not nonempty) and (inbox or f != "INBOX"))

    def _changed(self) -> None:
        """Every ``sync_every``-th change of an example is followed by a sync at once."""
        self.dirty = True
        self.changes += 1
        if self.changes % self.sync_every == 0:
            self._sync_and_check()

    def _free_names(self) -> list[str]:
        return [f for f in FOLDER_NAMES if f not in self.counts]

    @staticmethod
    def _pick(imap: IMAPClient, folder: str, picks: list[int]) -> list[int]:
        imap.select_folder(folder)
        uids = sorted(imap.search("ALL"))
        return sorted({uids[p % len(uids)] for p in picks})

    def _server(self) -> dict[str, ServerFolder]:
        """Every selectable folder of the server with its messages."""
        out: dict[str, ServerFolder] = {}
        with self._imap() as imap:
            for flags, _, name in imap.list_folders():
                if b"\\Noselect" in flags or b"\\NonExistent" in flags:
                    continue
                info = imap.select_folder(name, readonly=True)
                uids = imap.search("ALL") if info[b"EXISTS"] else []
                fetched = imap.fetch(uids, ["BODY.PEEK[]", "FLAGS"]) if uids else {}
                out[name] = ServerFolder(
                    int(info[b"UIDVALIDITY"]),
                    {uid: (_sha(d[b"BODY[]"]), _flags(d[b"FLAGS"])) for uid, d in fetched.items()})
                for d in fetched.values():
                    found = re.search(rb"Message-ID: <([^>]+)>", d[b"BODY[]"])
                    if found:
                        self.message_ids[_sha(d[b"BODY[]"])] = found.group(1).decode()
        return out

    def _renamed_by_content(self, server: dict[str, ServerFolder], vanished: list[str],
                            candidates: list[str]) -> dict[str, str]:
        """The product's second way (a server that gives a renamed folder a new UIDVALIDITY,
        as Courier does, or a folder renamed and re-created between two syncs): a vanished
        enabled folder is the one new folder holding all of its newest stored Message-IDs among
        its own newest messages (services/fetcher/planning.py, ``detect_renames``).
        Returns new name -> old name."""
        found: dict[str, str] = {}
        for old in sorted(vanished):
            stored = self.rows[old].messages  # the newest stored, as newest_message_ids reads
            sample = {self.message_ids[stored[uid][0]]
                      for uid in sorted(stored, reverse=True)[:RENAME_SAMPLE]}
            holders = [name for name in candidates if sample and sample <= {
                self.message_ids.get(sha, "") for _, (sha, _) in sorted(
                    server[name].messages.items())[-RENAME_SAMPLE * 5:]}]
            if len(holders) == 1 and holders[0] not in found:
                found[holders[0]] = old
        return found

    def _expect_folders(self, server: dict[str, ServerFolder]) -> None:
        """Apply a listing of the server's folders to the model (what every run does first):
        renames, new folders, the deletion rule."""
        listed = set(server)
        if RENAMES_DETECTED:  # a new name whose UIDVALIDITY is a vanished folder's: a rename
            vanished = {r.uidvalidity: name for name, r in self.rows.items()
                        if name not in listed and r.uidvalidity is not None}
            for name in sorted(listed - set(self.rows)):
                old = vanished.pop(server[name].uidvalidity, None)
                if old is not None:
                    self.rows[name] = self.rows.pop(old)
            unmatched = [old for old in vanished.values() if self.rows[old].enabled]
            candidates = sorted(listed - set(self.rows))
            if unmatched and candidates:
                for name, old in self._renamed_by_content(server, unmatched, candidates).items():
                    self.rows[name] = self.rows.pop(old)
        initial = {f.casefold() for f in INITIAL_FOLDERS}
        for name in listed:
            if name in self.rows:
                self.rows[name].gone = False
            else:
                self.rows[name] = Row(enabled=name.casefold() in initial)
        for name in sorted(set(self.rows) - listed):
            if self.rows[name].messages:  # holds synced mail (not only expunged mail): kept
                self.rows[name].gone = True
            else:
                del self.rows[name]

    def _expect(self, server: dict[str, ServerFolder]) -> None:
        """Apply one sync to the model: the folder list, then the enabled folders' mail."""
        self._expect_folders(server)
        for name, row in self.rows.items():
            if row.enabled and not row.gone:
                row.uidvalidity = server[name].uidvalidity
                row.messages = dict(server[name].messages)
                self.hashes |= {sha for sha, _ in row.messages.values()}

    def _sync_and_check(self, force: bool = False) -> None:
        """``force``: ``sync --force`` re-reads the whole first-sync window, not only new UIDs."""
        server = self._server()
        assert {name: len(f.messages) for name, f in server.items()} == self.counts, \
            "the test's own bookkeeping of the server is wrong"
        self._expect(server)
        result = services.run_cli(["sync", "--mailbox", str(self.mailbox_id), "--wait",
                                   "--timeout", "60", "--json", *(["--force"] if force else [])],
                                  self.ctx.env)
        assert result.returncode == 0, (
            f"sync exited {result.returncode}: {result.stderr.decode()}{result.stdout.decode()}"
            f"\n{self.ctx.processes.logs()}")
        self.ctx.processes.assert_running()
        run = json.loads(result.stdout)[0]
        if not self.dirty and not force:  # invariant 6: nothing changed, nothing is fetched again
            assert run["messages_stored"] == 0, f"an unchanged mailbox fetched again: {run}"
        self.dirty = False

        listed, messages = _cli_parallel(self.ctx.env, [
            ["mailbox", "folders", str(self.mailbox_id), "--json"],
            ["messages", "list", "--mailbox", str(self.mailbox_id), "--json"]])
        got = {f["name"]: (f["sync_enabled"], f["gone_at"] is not None, f["messages"])
               for f in listed}
        want = {name: (r.enabled, r.gone, len(r.messages)) for name, r in self.rows.items()}
        assert got == want, (
            "the store's folders (sync_enabled, gone, messages) differ from the model: "
            + "; ".join(f"{name}: store {got.get(name, 'missing')}, "
                        f"expected {want.get(name, 'missing')}"
                        for name in sorted(set(got) | set(want)) if got.get(name) != want.get(name)))
        stored: State = {(m["folder"], m["uid"]): (m["sha256"], tuple(sorted(m["flags"])))
                         for m in messages}
        expected: State = {(name, uid): v for name, r in self.rows.items()
                           for uid, v in r.messages.items()}
        assert_same_state(stored, expected)

        raw = {bytes(r["sha256"]).hex() for r in self.ctx.conn.execute(
            "SELECT sha256 FROM raw_messages").fetchall()}
        assert raw == self.raw_before | self.hashes, (
            "raw_messages must hold each distinct sha256 synced once: "
            f"unexpected {sorted(h[:10] for h in raw - self.raw_before - self.hashes)}, "
            f"missing {sorted(h[:10] for h in (self.raw_before | self.hashes) - raw)}")
        parsed = self.ctx.conn.execute(
            "SELECT count(*) AS n, count(DISTINCT sha256) AS d FROM messages WHERE mailbox_id = %s",
            (self.mailbox_id,)).fetchone()
        assert parsed == {"n": len(self.hashes), "d": len(self.hashes)}, \
            "messages must hold each distinct sha256 synced into the mailbox exactly once"

    # -- syncs ------------------------------------------------------------------------------

    @initialize(seed=st.lists(st.tuples(st.sampled_from(("INBOX", "Work")), st.integers(0, 11),
                                        st.sets(st.sampled_from(FLAGS), max_size=3)),
                              min_size=1, max_size=8),
                sync_every=st.integers(1, 4))
    def first_sync(self, seed: list[tuple[str, int, set[str]]], sync_every: int) -> None:
        """Some mail, then the first sync: the rules then exercise the incremental paths. Every
        ``sync_every``-th change after it syncs at once (so that syncs are interleaved at every
        density, whatever rules hypothesis favours); the ``sync`` rules add more."""
        self.sync_every = sync_every
        with self._imap() as imap:
            for folder, k, flags in seed:
                imap.append(folder, message(k), flags=sorted(flags))
                self.counts[folder] += 1
        self._sync_and_check()

    @rule(force=st.booleans())
    def sync(self, force: bool) -> None:
        self._sync_and_check(force)

    @rule(force=st.booleans())
    def sync_(self, force: bool) -> None:
        self._sync_and_check(force)

    # -- server-side changes -----------------------------------------------------------------

    # Hypothesis draws its first rule (fewest arguments first) far more often than the others: a
    # cheap flag change, rather than a sync.
    @precondition(lambda self: self._folders(nonempty=True))
    @rule()
    def toggle_flagged(self) -> None:
        """\\Flagged toggled on the oldest message of the first folder holding mail."""
        folder = self._folders(nonempty=True)[0]
        with self._imap() as imap:
            uid = self._pick(imap, folder, [0])
            flagged = b"\\Flagged" in imap.get_flags(uid)[uid[0]]
            (imap.remove_flags if flagged else imap.add_flags)(uid, [b"\\Flagged"])
        self._changed()

    @rule(data=st.data(), k=st.integers(0, 11),
          flags=st.sets(st.sampled_from(FLAGS), max_size=3))
    def append(self, data: st.DataObject, k: int, flags: set[str]) -> None:
        folder = data.draw(st.sampled_from(self._folders()), label="folder")
        with self._imap() as imap:
            imap.append(folder, message(k), flags=sorted(flags))
        self.counts[folder] += 1
        self._changed()

    @precondition(lambda self: self._folders(nonempty=True))
    @rule(data=st.data(), picks=st.lists(st.integers(0, 30), min_size=1, max_size=3),
          flags=st.sets(st.sampled_from(FLAGS), min_size=1, max_size=2), add=st.booleans())
    def change_flags(self, data: st.DataObject, picks: list[int], flags: set[str],
                     add: bool) -> None:
        folder = data.draw(st.sampled_from(self._folders(nonempty=True)), label="folder")
        with self._imap() as imap:
            uids = self._pick(imap, folder, picks)
            (imap.add_flags if add else imap.remove_flags)(uids, sorted(flags))
        self._changed()

    @precondition(lambda self: self._folders(nonempty=True))
    @rule(data=st.data(), picks=st.lists(st.integers(0, 30), min_size=1, max_size=3))
    def expunge(self, data: st.DataObject, picks: list[int]) -> None:
        folder = data.draw(st.sampled_from(self._folders(nonempty=True)), label="folder")
        with self._imap() as imap:
            uids = self._pick(imap, folder, picks)
            imap.delete_messages(uids)
            imap.expunge()
        self.counts[folder] -= len(uids)
        self._changed()

    @precondition(lambda self: self._folders(nonempty=True) and len(self.counts) > 1)
    @rule(data=st.data(), picks=st.lists(st.integers(0, 30), min_size=1, max_size=3))
    def move(self, data: st.DataObject, picks: list[int]) -> None:
        source = data.draw(st.sampled_from(self._folders(nonempty=True)), label="from")
        target = data.draw(st.sampled_from([f for f in self._folders() if f != source]),
                           label="to")
        with self._imap() as imap:
            uids = self._pick(imap, source, picks)
            if imap.has_capability("MOVE"):
                imap.move(uids, target)
            else:
                imap.copy(uids, target)
                imap.delete_messages(uids)
                imap.expunge()
        self.counts[source] -= len(uids)
        self.counts[target] += len(uids)
        self._changed()

    @precondition(lambda self: self._folders(nonempty=True))
    @rule(data=st.data(), picks=st.lists(st.integers(0, 30), min_size=1, max_size=3))
    def copy(self, data: st.DataObject, picks: list[int]) -> None:
        source = data.draw(st.sampled_from(self._folders(nonempty=True)), label="from")
        target = data.draw(st.sampled_from(self._folders()), label="to")  # may be the same
        with self._imap() as imap:
            uids = self._pick(imap, source, picks)
            imap.copy(uids, target)
        self.counts[target] += len(uids)
        self._changed()

    @precondition(lambda self: self._free_names())
    @rule(data=st.data())
    def create_folder(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(self._free_names()), label="name")
        with self._imap() as imap:
            imap.create_folder(name)
        self.counts[name] = 0
        self._changed()

    @precondition(lambda self: self._free_names() and self._folders(inbox=False))
    @rule(data=st.data())
    def rename_folder(self, data: st.DataObject) -> None:
        old = data.draw(st.sampled_from(self._folders(inbox=False)), label="old")
        new = data.draw(st.sampled_from(self._free_names()), label="new")
        with self._imap() as imap:
            imap.rename_folder(old, new)
        self.counts[new] = self.counts.pop(old)
        self._changed()

    @precondition(lambda self: self._folders(inbox=False))
    @rule(data=st.data())
    def delete_folder(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(self._folders(inbox=False)), label="name")
        with self._imap() as imap:
            imap.delete_folder(name)
        del self.counts[name]
        self._changed()

    @precondition(lambda self: self._folders(inbox=False))
    @rule(data=st.data())
    def reset_uidvalidity(self, data: st.DataObject) -> None:
        """The folder is deleted and made anew with the same messages, flags and dates."""
        name = data.draw(st.sampled_from(self._folders(inbox=False)), label="name")
        with self._imap() as imap:
            before = imap.select_folder(name, readonly=True)[b"UIDVALIDITY"]
            uids = imap.search("ALL")
            kept = imap.fetch(uids, ["BODY.PEEK[]", "FLAGS", "INTERNALDATE"]) if uids else {}
            imap.close_folder()
            imap.delete_folder(name)
            imap.create_folder(name)
            for _, d in sorted(kept.items()):
                imap.append(name, d[b"BODY[]"], flags=_flags(d[b"FLAGS"]),
                            msg_time=d[b"INTERNALDATE"])
            after = imap.folder_status(name, ["UIDVALIDITY"])[b"UIDVALIDITY"]
        assert after != before, "Dovecot kept the UIDVALIDITY of a re-created folder"
        self._changed()

    # -- the user's settings -----------------------------------------------------------------

    @precondition(lambda self: any(not r.enabled and not r.gone for r in self.rows.values()))
    @rule(data=st.data())
    def enable_folder(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(sorted(n for n, r in self.rows.items()
                                                if not r.enabled and not r.gone)), label="name")
        self._cli(["mailbox", "folders", str(self.mailbox_id), "--enable", name, "--json"])
        self.rows[name].enabled = True  # the next sync must include it
        # A changed selection lists the folders at once (a folder run, not the mail): wait for
        # it, then the model applies the same listing.
        self._wait_for_runs()
        self._expect_folders(self._server())
        self._changed()

    @precondition(lambda self: any(r.enabled and not r.gone for r in self.rows.values()))
    @rule(data=st.data())
    def disable_folder(self, data: st.DataObject) -> None:
        """Its synced mail stays in the store as it was; enabled again, it catches up."""
        name = data.draw(st.sampled_from(sorted(n for n, r in self.rows.items()
                                                if r.enabled and not r.gone)), label="name")
        self._cli(["mailbox", "folders", str(self.mailbox_id), "--disable", name, "--json"])
        self.rows[name].enabled = False
        self._wait_for_runs()
        self._expect_folders(self._server())
        self._changed()

    def _wait_for_runs(self) -> None:
        def idle() -> bool:
            active = self.ctx.conn.execute(
                """SELECT count(*) AS n FROM sync_runs
                    WHERE mailbox_id = %s AND status IN ('queued', 'running')""",
                (self.mailbox_id,)).fetchone()
            return active is not None and active["n"] == 0
        assert services.eventually(idle, timeout=60), "the folder run did not finish"
        failed = self.ctx.conn.execute(
            "SELECT kind, error FROM sync_runs WHERE mailbox_id = %s AND status <> 'done'",
            (self.mailbox_id,)).fetchall()
        assert not failed, f"runs failed: {failed}"

    def teardown(self) -> None:
        # After a failure, only report it; otherwise the example ends with one more sync.
        if sys.exc_info()[0] is None and self.dirty:
            self._sync_and_check()


def _cli_parallel(env: dict[str, str], commands: list[list[str]]) -> list[Any]:
    """Run read-only mailferry commands at once (each one starts a Python interpreter)."""
    procs = [subprocess.Popen([sys.executable, "-m", "mailferry.services.cli.main", *args],
                              env={**os.environ, **env}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, cwd=services.REPO) for args in commands]
    out = []
    for args, proc in zip(commands, procs, strict=True):
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"mailferry {' '.join(args)}: {stderr.decode()}"
        out.append(json.loads(stdout))
    return out


def assert_same_state(stored: State, expected: State) -> None:
    if stored == expected:
        return
    lines = []
    for key in sorted(set(stored) | set(expected)):
        if stored.get(key) != expected.get(key):
            lines.append(f"  {key}: store {_short(stored.get(key))}, "
                         f"expected {_short(expected.get(key))}")
    raise AssertionError("the store differs from the server (folder, uid):\n" + "\n".join(lines))


def _short(value: tuple[str, tuple[str, ...]] | None) -> str:
    return "missing" if value is None else f"{value[0][:10]} {list(value[1])}"


# -- the tests ----------------------------------------------------------------------------------


@pytest.fixture(params=[(), ("CONDSTORE", "QRESYNC")], ids=["condstore", "no-condstore"])
def server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Dovecot]:
    with Dovecot(tmp_path / "dovecot", capabilities_hidden=request.param) as dovecot:
        yield dovecot


def _run(profile: str, env: dict[str, str], server: Dovecot, conn: db.Connection,
         processes: services.ServiceProcesses) -> None:
    processes.start("fetcher")
    processes.start("persister")
    owner = "model@example.com"
    assert services.run_cli(["user", "add", "--email", owner], env).returncode == 0
    ctx = Context(server=server, env=env, conn=conn, processes=processes, owner=owner)
    run_state_machine_as_test(
        lambda: SyncModel(ctx),
        settings=settings(deadline=None, suppress_health_check=list(HealthCheck),
                          print_blob=True, **PROFILES[profile]),
    )


@pytest.mark.early
@pytest.mark.timeout(3600 if PROFILE == "long" else 1200)
def test_the_store_converges_under_random_server_changes(
    env: dict[str, str], server: Dovecot, conn: db.Connection,
    processes: services.ServiceProcesses,
) -> None:
    _run(PROFILE, env, server, conn, processes)


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_the_store_converges_under_random_server_changes_long(
    env: dict[str, str], server: Dovecot, conn: db.Connection,
    processes: services.ServiceProcesses,
) -> None:
    _run("long", env, server, conn, processes)
