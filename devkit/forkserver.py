"""Run CLI commands in processes forked from one that has already imported mailferry.

A ``mailferry`` command spends most of its CPU importing (pydantic, psycopg, kombu, the message
models: about a second on this machine's cores), and the test suite runs hundreds of them. The
fork server imports the CLI once; each command is then a fresh ``fork()`` of it that sets its
environment, arguments, working directory and standard streams, runs ``main()`` and exits, so a
command still runs in a process of its own, with its own settings read from its environment
(``load_settings`` is first called in the child), exactly as ``python -m
mailferry.services.cli.main`` would run it.

The server is single-threaded (so forking it is safe) and only accepts connections and forks;
the child handles its connection: the request (JSON: args, env, cwd, stdin), its pid back at
once (so the caller can kill it on a timeout), then the exit code and captured output.
The tests turn it on (``tests/conftest.py`` sets ``MAILFERRY_DEVKIT_FORK=1`` unless it is set);
the benchmarks and the demo keep new interpreters, as in production, so that start-up costs
are measured. ``MAILFERRY_DEVKIT_FORK=0`` makes the tests start new interpreters too.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import json
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

_HEADER = struct.Struct("!I")


def _send(sock: socket.socket, obj: Any) -> None:
    data = json.dumps(obj).encode()
    sock.sendall(_HEADER.pack(len(data)) + data)


def _recv(sock: socket.socket) -> Any:
    def exactly(n: int) -> bytes:
        chunks = []
        while n:
            chunk = sock.recv(min(n, 1 << 20))
            if not chunk:
                raise ConnectionError("the fork server's child closed the connection")
            chunks.append(chunk)
            n -= len(chunk)
        return b"".join(chunks)

    (size,) = _HEADER.unpack(exactly(_HEADER.size))
    return json.loads(exactly(size))


# --- the server ---------------------------------------------------------------------------------


def _serve(path: str) -> None:
    from mailferry.services.cli import main as cli_main  # the import this whole module saves

    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    while True:
        conn, _ = listener.accept()
        if os.fork() == 0:
            listener.close()
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # the command may run subprocesses
            _child(conn, cli_main.main)
        conn.close()


def _child(conn: socket.socket, main: Any) -> None:
    code = 1
    try:
        request = _recv(conn)
        _send(conn, {"pid": os.getpid()})
        os.environ.clear()
        os.environ.update(request["env"])
        os.chdir(request["cwd"])
        os.setpgid(0, 0)  # signals to the caller's process group (Ctrl-C) are the caller's
        streams: list[IO[bytes]] = [tempfile.TemporaryFile() for _ in range(3)]  # noqa: SIM115 - open until exit
        streams[0].write(base64.b64decode(request.get("stdin", "")))
        streams[0].seek(0)
        if request.get("log"):  # a service: both streams to its log, nothing sent back
            log = open(request["log"], "ab")  # noqa: SIM115 - open until exit
            streams[1] = streams[2] = log
        for fd, stream in enumerate(streams):
            os.dup2(stream.fileno(), fd)
        sys.argv = ["mailferry", *request["args"]]
        try:
            main()
            code = 0
        except SystemExit as exc:
            if isinstance(exc.code, int) or exc.code is None:
                code = exc.code or 0
            else:
                print(exc.code, file=sys.stderr)
                code = 1
        except BaseException:  # reported as an interpreter would
            import traceback

            traceback.print_exc()
            code = 1
        # What the interpreter does on its way out: wait for non-daemon threads, run atexit.
        threading._shutdown()  # type: ignore[attr-defined]
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
        output = []
        for stream in streams[1:]:
            stream.seek(0)
            output.append(base64.b64encode(b"" if request.get("log") else stream.read()).decode())
        _send(conn, {"returncode": code, "stdout": output[0], "stderr": output[1]})
    finally:
        os._exit(code if 0 <= code < 256 else 1)


# --- the client ---------------------------------------------------------------------------------

_lock = threading.Lock()
_server: tuple[subprocess.Popen[bytes], str] | None = None


def enabled() -> bool:
    return os.environ.get("MAILFERRY_DEVKIT_FORK", "0") == "1" and hasattr(os, "fork")


def _address() -> str:
    """The server's socket, started on first use (one server per calling process)."""
    global _server
    with _lock:
        if _server is not None and _server[0].poll() is None:
            return _server[1]
        folder = tempfile.mkdtemp(prefix="mailferry-fork-")
        path = str(Path(folder) / "socket")
        proc = subprocess.Popen([sys.executable, "-m", "mailferry.devkit.forkserver", path],
                                stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
        assert proc.stdout is not None
        if proc.stdout.readline() != b"ready\n":
            proc.kill()
            raise RuntimeError("the CLI fork server did not start")
        atexit.register(proc.kill)
        atexit.register(shutil.rmtree, folder, True)  # runs first (atexit is last in, first out)
        _server = (proc, path)
        return path


def run(args: list[str], env: Mapping[str, str], cwd: Path, stdin: bytes | None,
        timeout: float) -> subprocess.CompletedProcess[bytes]:
    """``subprocess.run([python, -m, mailferry.services.cli.main, *args], ...)``, forked."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(_address())
        sock.settimeout(timeout)
        _send(sock, {"args": args, "env": dict(env), "cwd": str(cwd),
                     "stdin": base64.b64encode(stdin or b"").decode()})
        pid = _recv(sock)["pid"]
        try:
            result = _recv(sock)
        except TimeoutError:
            os.kill(pid, signal.SIGKILL)
            raise subprocess.TimeoutExpired(["mailferry", *args], timeout) from None
    return subprocess.CompletedProcess(
        ["mailferry", *args], result["returncode"], base64.b64decode(result["stdout"]),
        base64.b64decode(result["stderr"]))


class Process:
    """A long-running command forked by the server (a service), with the parts of
    :class:`subprocess.Popen` that the devkit and the tests use. The child is the server's, not
    the caller's: its end is its connection closing, after it sent its exit code; a process
    killed by a signal sends none, and its return code is minus the last signal sent to it
    through this object (SIGKILL when none was)."""

    def __init__(self, args: list[str], env: Mapping[str, str], cwd: Path, log: Path) -> None:
        self.args = ["mailferry", *args]
        self.returncode: int | None = None
        self._signal = signal.SIGKILL
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.connect(_address())
        _send(self._sock, {"args": args, "env": dict(env), "cwd": str(cwd), "log": str(log)})
        self.pid: int = _recv(self._sock)["pid"]

    def _ended(self, timeout: float | None) -> bool:
        if self.returncode is not None:
            return True
        ready, _, _ = select.select([self._sock], [], [], timeout)
        if not ready:
            return False
        try:
            self.returncode = int(_recv(self._sock)["returncode"])
        except (ConnectionError, OSError):
            self.returncode = -int(self._signal)
        self._sock.close()
        return True

    def poll(self) -> int | None:
        self._ended(0)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if not self._ended(timeout):
            raise subprocess.TimeoutExpired(self.args, timeout or 0)
        assert self.returncode is not None
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            if sig in (signal.SIGKILL, signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
                self._signal = signal.Signals(sig)
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def spawn(args: list[str], env: Mapping[str, str], cwd: Path, log: Path) -> Process:
    """``subprocess.Popen([python, -m, mailferry.services.cli.main, *args], stdout=log,
    stderr=STDOUT, ...)``, forked."""
    return Process(args, env, cwd, log)


if __name__ == "__main__":
    _serve(sys.argv[1])
