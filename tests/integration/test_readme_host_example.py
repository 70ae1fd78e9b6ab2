"""The README's host-application example (a CRM adding a mailbox and asking for a sync in
Python, no CLI) must run as printed."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from mailferry import db
from mailferry.devkit import services
from mailferry.devkit.dovecot import Dovecot


def test_the_readme_host_application_example_adds_a_mailbox_and_queues_its_sync(
    tmp_path: Path, env: dict[str, str], conn: db.Connection,
) -> None:
    with Dovecot(tmp_path / "dovecot") as server:
        server.add_user("carol", "secret")
        script = tmp_path / "host_app.py"
        script.write_text(services.readme_example("Embedding it in a host application"))
        result = subprocess.run(
            [sys.executable, str(script), server.host, str(server.port), "carol", "secret"],
            capture_output=True, timeout=60, cwd=services.REPO, env={**os.environ, **env})
    out = result.stdout.decode()
    assert result.returncode == 0, result.stderr.decode()
    assert "refused: email: must be one email address" in out, out
    assert "user 1, mailbox 1" in out, out
    assert re.search(r"logged in to .*: \['INBOX'", out), out
    assert re.search(r"sync queued: run [0-9a-f-]{36}", out), out
    assert conn.execute("SELECT email FROM users").fetchall() == [{"email": "carol@example.com"}]
    assert conn.execute("SELECT mailbox_id, status, requested_by FROM sync_runs").fetchall() == [
        {"mailbox_id": 1, "status": "queued", "requested_by": "crm"}]
