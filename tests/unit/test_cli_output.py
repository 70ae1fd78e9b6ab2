"""What the CLI prints: the progress bar of a sync, and server text made safe for a terminal."""
from __future__ import annotations

from mailferry.services.cli.main import _progress_line, _visible


def _run(status: str, folders_total: int | None = None, found: int = 0, done: int = 0,
         folders_done: int = 0) -> dict[str, object]:
    return {"status": status, "folders_total": folders_total, "messages_found": found,
            "messages_done": done, "folders_done": folders_done}


def test_the_progress_bar_waits_for_a_fetcher_before_anything_is_known() -> None:
    assert _progress_line([_run("queued")]) == "waiting for a fetcher (0/1 mailboxes done)"


def test_the_progress_bar_fills_with_stored_messages_of_all_runs() -> None:
    line = _progress_line([_run("running", 4, found=300, done=100, folders_done=1),
                           _run("done", 2, found=100, done=100, folders_done=2)], width=10)
    assert line == "[#####-----] 200/400 messages  3/6 folders  1/2 mailboxes"


def test_a_finished_run_counts_whole_even_when_it_failed_half_way() -> None:
    line = _progress_line([_run("failed", 3, found=50, done=20, folders_done=1)], width=4)
    assert line == "[####] 50/50 messages  3/3 folders  1/1 mailboxes"


def test_text_from_servers_and_users_cannot_drive_an_operators_terminal() -> None:
    assert _visible("Inbox\r\nFAKE LINE\x1b[2J") == "Inbox\\r\\nFAKE LINE\\x1b[2J"
    assert _visible("Données/Été 日本") == "Données/Été 日本"
