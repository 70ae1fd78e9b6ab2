"""The devkit's CLI fork server runs a command as a new interpreter would (devkit/forkserver.py)."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from mailferry.devkit import forkserver, services

NO_DATABASE = {"MAILFERRY_DATABASE_URL": "postgresql://postgres@127.0.0.1:1/none",
               "MAILFERRY_LOG_FORMAT": "json"}


def interpreter(args: list[str], stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "mailferry.services.cli.main", *args],
                          env={**services.os.environ, **NO_DATABASE}, input=stdin,
                          capture_output=True, timeout=120, cwd=services.REPO, check=False)


def forked(args: list[str], stdin: bytes | None = None,
           timeout: float = 120) -> subprocess.CompletedProcess[bytes]:
    return forkserver.run(args, {**services.os.environ, **NO_DATABASE}, services.REPO, stdin,
                          timeout)


@pytest.mark.parametrize("args", [["--help"], ["no-such-command"], ["user", "list", "--json"],
                                  ["mailbox", "import", "-"]])
def test_a_forked_command_exits_and_prints_as_a_new_interpreter_does(args: list[str]) -> None:
    stdin = b'{"not": "a mailbox"}\n'
    new, fork = interpreter(args, stdin), forked(args, stdin)
    assert (fork.returncode, fork.stdout, fork.stderr) == (new.returncode, new.stdout, new.stderr)


def test_each_forked_command_reads_its_own_environment() -> None:
    one = forked(["user", "list", "--json"])
    other = forkserver.run(["user", "list", "--json"],
                           {**services.os.environ, "MAILFERRY_DATABASE_URL": "nonsense://x"},
                           services.REPO, None, 60)
    assert one.returncode != 0 and other.returncode != 0
    assert b"127.0.0.1" in one.stderr and b"nonsense" in other.stderr


def test_a_forked_command_over_its_timeout_is_killed() -> None:
    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts, never answers
        port = silent.getsockname()[1]
        env = {**services.os.environ,
               "MAILFERRY_DATABASE_URL": f"postgresql://postgres@127.0.0.1:{port}/x"}
        with pytest.raises(subprocess.TimeoutExpired):
            forkserver.run(["user", "list", "--json"], env, services.REPO, None, 1.0)
