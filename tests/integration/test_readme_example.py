"""The README's library example is code people copy: it must run as printed."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from mailferry.devkit import services
from mailferry.devkit.dovecot import Dovecot


def test_the_readme_library_example_runs_against_a_real_server(tmp_path: Path) -> None:
    with Dovecot(tmp_path / "dovecot") as server:
        server.add_user("demo", "demo")
        with server.session("demo") as imap:
            imap.create_folder("Projets/Été")
            imap.append("INBOX", b"From: Ann <ann@example.com>\r\nSubject: unread one\r\n"
                                 b"Message-ID: <1@x>\r\n\r\nhello\r\n")
            imap.append("INBOX", b"Subject: seen\r\n\r\nread\r\n", flags=[b"\\Seen"])
        script = tmp_path / "example.py"
        script.write_text(services.readme_example("Using it as a library"))
        result = subprocess.run(
            [sys.executable, str(script), server.host, str(server.port), "demo", "demo"],
            capture_output=True, timeout=60, cwd=services.REPO)
    out = result.stdout.decode()
    assert result.returncode == 0, result.stderr.decode()
    assert "INBOX  (inbox)" in out and "Été  (other)" in out, out
    assert "INBOX holds 2 messages" in out, out
    [found] = [line for line in out.splitlines() if "unread one" in line]
    assert "Ann <ann@example.com>" in found or "ann@example.com" in found, found
    assert re.search(r"last one: \d+ bytes", out), out
