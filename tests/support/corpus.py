"""The real-world emails of ../shared/corpus, one bytes object per message."""

from __future__ import annotations

import mailbox
from pathlib import Path

from tests.support.services import CORPUS


def corpus_messages() -> list[tuple[str, bytes]]:
    """(name, raw bytes) of every message: each .eml file, and each message of each .mbox."""
    if not CORPUS.is_dir():
        raise FileNotFoundError(f"the shared corpus is missing at {CORPUS}")
    out: list[tuple[str, bytes]] = []
    for path in sorted(CORPUS.rglob("*")):
        if path.suffix == ".eml":
            out.append((str(path.relative_to(CORPUS)), path.read_bytes()))
        elif path.suffix == ".mbox":
            for i, message in enumerate(mailbox.mbox(path, create=False)):
                out.append((f"{path.relative_to(CORPUS)}#{i}", message.as_bytes()))
    return out


def corpus_dir() -> Path:
    return CORPUS
