"""``mailferry changes``: the change stream for integrators, live or from PostgreSQL.

Its own module (registered by ``services/cli/main.py``); it parses, calls ``mailferry.app.changes``
and prints. Errors raised here reach ``main``'s group, which turns them into one line and an exit
code like every other command's.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any

import click

from mailferry import db
from mailferry.app import changes as service
from mailferry.config import Settings, load_settings
from mailferry.errors import ConfigError


def _settings() -> Settings:
    try:
        return load_settings()
    except Exception as exc:  # pydantic's ValidationError: say which variable is wrong
        raise ConfigError(f"invalid configuration: {' '.join(str(exc).split())}") from exc


@click.group("changes")
def changes() -> None:
    """What changed in the store, as other applications see it (the mailferry.changes exchange)."""


def _line(change: dict[str, Any]) -> str:
    """One line for people: seq, mailbox, type, and what it is about (control characters
    escaped: subjects and folder names come from mail servers)."""
    about = " ".join(str(part) for part in (
        change.get("folder"), f"uid {change['uid']}" if "uid" in change else None,
        f"from {change['from']}" if change.get("from") else None,
        json.dumps(change["subject"], ensure_ascii=False) if change.get("subject") else None,
        "(backfill)" if change.get("backfill") else None,
        change.get("previous_name") and f"(was {change['previous_name']})",
        change.get("error")) if part)
    text = f"{change['seq']:>6}  mailbox {change['mailbox_id']}  {change['type']}  {about}"
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text).rstrip()


def _print(change: dict[str, Any], as_json: bool) -> None:
    click.echo(json.dumps(change, ensure_ascii=False) if as_json else _line(change))


@changes.command("tail")
@click.option("--mailbox", "mailbox_id", type=int, help="only this mailbox's changes")
@click.option("--json", "as_json", is_flag=True, help="one JSON object per line")
def tail(mailbox_id: int | None, as_json: bool) -> None:
    """Print changes as they are published, until Ctrl-C (a queue of its own, gone after)."""
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C is how a tail ends
        service.tail(_settings().broker_url, lambda change: _print(change, as_json), mailbox_id)


@changes.command("list")
@click.option("--since", "since", type=click.IntRange(0), required=True,
              help="changes numbered above this (each mailbox's own sequence)")
@click.option("--mailbox", "mailbox_id", type=int, help="only this mailbox's changes")
@click.option("--limit", default=1000, show_default=True, type=click.IntRange(1, 100000))
@click.option("--json", "as_json", is_flag=True, help="a JSON array of the events")
def list_(since: int, mailbox_id: int | None, limit: int, as_json: bool) -> None:
    """Changes kept in PostgreSQL (MAILFERRY_CHANGES_RETENTION), for a consumer catching up."""
    with db.connect(_settings().database_url, autocommit=True) as conn:
        found = service.list_changes(conn, since, mailbox_id, limit)
    if as_json:
        click.echo(json.dumps(found, ensure_ascii=False))
        return
    for change in found:
        _print(change, False)
    if not found:
        click.echo("(none)")
