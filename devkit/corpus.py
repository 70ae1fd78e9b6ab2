"""The real-world emails of ``../shared/corpus`` (two public projects' test suites), the one
place tests find them.

The corpus lives beside the repository, not in it: a clone on its own has none. Its path is
``MAILFERRY_TEST_CORPUS`` (default ``../shared/corpus``); when it is absent, the tests that need
it are skipped with one line saying where it was looked for, and everything else runs.
``MAILFERRY_REQUIRE_CORPUS=1`` (CI sets it) turns that skip into a failure, so nothing is skipped
there by accident.
"""

from __future__ import annotations

import mailbox
import os
import re
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
CORPUS = Path(os.environ.get("MAILFERRY_TEST_CORPUS") or REPO.parent / "shared" / "corpus")
REQUIRED = os.environ.get("MAILFERRY_REQUIRE_CORPUS") == "1"
MISSING = f"the real-world corpus is not at {CORPUS} (set MAILFERRY_TEST_CORPUS to its folder)"
#: Corpus files that hold messages: single messages (.eml, MimeKit's .txt) and mboxes.
MESSAGE_SUFFIXES = {".eml", ".txt", ".mbox"}


def present() -> bool:
    return CORPUS.is_dir()


#: Marks a test that reads the corpus: skipped, saying where it looked, when there is none.
needs_corpus = pytest.mark.skipif(not present() and not REQUIRED, reason=MISSING)


def require() -> None:
    """Inside a test: skip (or, where the corpus is required, fail) when it is absent."""
    if not present():
        if REQUIRED:
            pytest.fail(MISSING)
        pytest.skip(MISSING)


def corpus_files() -> list[Path]:
    """Every message file of the corpus (README, LICENSE and the empty sample are not)."""
    if not present():
        return []
    return sorted(p for p in CORPUS.rglob("*") if p.is_file() and p.suffix in MESSAGE_SUFFIXES)


def file_params() -> list[Any]:
    """``corpus_files()`` for ``pytest.mark.parametrize``: one skipped (or failing) case saying
    where the corpus was looked for when it is absent, never an empty parameter set."""
    files = corpus_files()
    if files:
        return [pytest.param(p, id=str(p.relative_to(CORPUS))) for p in files]
    return [pytest.param(None, id="corpus-missing", marks=needs_corpus)]


def split_mbox(data: bytes) -> list[bytes]:
    """Split an mbox on its ``From `` separator lines, keeping each separator line.

    ``unmunged.mbox`` deliberately has unescaped "From " lines in bodies, so some pieces
    are message fragments: exactly the kind of input the parser must survive.
    """
    return [chunk for chunk in re.split(rb"\n(?=From )", data) if chunk.strip()]


def messages_in(path: Path) -> list[bytes]:
    """The raw messages held by one corpus file."""
    data = path.read_bytes()
    return split_mbox(data) if path.suffix == ".mbox" else [data]


def corpus_messages() -> list[tuple[str, bytes]]:
    """(name, raw bytes) of every message: each .eml file, and each message of each .mbox."""
    require()
    out: list[tuple[str, bytes]] = []
    for path in sorted(CORPUS.rglob("*")):
        if path.suffix == ".eml":
            out.append((str(path.relative_to(CORPUS)), path.read_bytes()))
        elif path.suffix == ".mbox":
            for i, message in enumerate(mailbox.mbox(path, create=False)):
                out.append((f"{path.relative_to(CORPUS)}#{i}", message.as_bytes()))
    return out
