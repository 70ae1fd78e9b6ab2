"""One owner for the sync run's life cycle: no module but shared/runs.py writes ``sync_runs``."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).parents[2]
WRITE = re.compile(r"\b(INSERT\s+INTO|UPDATE|DELETE\s+FROM)\s+sync_runs\b", re.IGNORECASE)


def test_no_module_but_shared_runs_writes_the_sync_runs_table() -> None:
    writers = sorted(
        f"{path.relative_to(ROOT)}:{text[:match.start()].count(chr(10)) + 1}"
        for folder in ("shared", "services", "scripts")
        for path in (ROOT / folder).rglob("*.py")
        if path != ROOT / "shared" / "runs.py"
        for text in [path.read_text()]
        for match in WRITE.finditer(text)
    )
    assert writers == []


def test_the_owner_check_would_see_a_write() -> None:
    assert WRITE.search('conn.execute("UPDATE  sync_runs SET status = 1")')
    assert WRITE.search("insert into sync_runs (id) values (1)")
    assert not WRITE.search("SELECT status FROM sync_runs")
