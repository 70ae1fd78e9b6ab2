"""Private, throw-away Dovecot IMAP servers for tests, the demo and benchmarks.

Why a real Dovecot rather than a fake IMAP server: the sync service depends on
subtle server behaviour (UIDVALIDITY, CONDSTORE/QRESYNC, SPECIAL-USE, modified
UTF-7 folder names, TLS) that fakes get wrong. Dovecot is quick to start, so
every test process can run its own instances without touching ``/etc/dovecot``
or any system-wide state.

Each :class:`Dovecot` instance lives entirely inside a base directory::

    base/
      dovecot.conf      generated configuration (only file the server reads)
      users.dict        IMAP users and passwords (Dovecot file dict)
      dict-auth.conf.ext  passdb settings pointing at users.dict
      mail/             mail chroot; mail/<user>/Maildir holds each mailbox
      state/            Dovecot state_dir
      run/              Dovecot base_dir (sockets, pid file) - see below
      tls/              self-signed CA + server certificate when ``ssl=True``
      dovecot.log       everything Dovecot logs
      master.out        stdout/stderr of the master process

Unix socket paths are limited to 108 bytes, so when ``base/run`` would be too
long (deep pytest temp dirs) a short private directory under ``/tmp`` is used
for the sockets instead and removed again by :meth:`Dovecot.stop`.

Running as root: Dovecot refuses to access mail as uid 0, so mail processes
run as the ``dovecot`` system user, chrooted into ``base/mail``. The chroot is
what makes it work inside pytest's ``/tmp/pytest-of-root`` (mode 0700): the
unprivileged mail processes never need to traverse the parents of the base
directory. Everything else (auth, config, log) stays root. When not running as
root the instance runs "rootless" under the current user instead.

Typical fixture::

    @pytest.fixture
    def imap_server(tmp_path: Path) -> Iterator[Dovecot]:
        with Dovecot(tmp_path / "dovecot") as server:
            server.add_user("alice", "secret")
            yield server
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import errno
import fcntl
import grp
import json
import os
import pwd
import re
import shutil
import signal
import socket
import ssl as ssl_module
import struct
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime
from pathlib import Path
from types import TracebackType

from imapclient import IMAPClient, imap_utf7

__all__ = [
    "Dovecot",
    "DovecotError",
    "MaildirMessage",
    "dovecot_version",
    "ensure_dovecot_installed",
]

HOST = "127.0.0.1"
DOVECOT_BINARY = "/usr/sbin/dovecot"
APT_PACKAGE = "dovecot-imapd"
# Binaries the harness needs besides the master (imap comes from dovecot-imapd).
_HELPER_BINARIES = ("/usr/lib/dovecot/imap", "/usr/lib/dovecot/imap-login")
_APT_LOCKS = (
    "/var/lib/dpkg/lock-frontend",
    "/var/lib/dpkg/lock",
    "/var/lib/apt/lists/lock",
    "/var/cache/apt/archives/lock",
)
_APT_PROCESS_NAMES = frozenset({"apt", "apt-get", "dpkg", "aptitude", "unattended-upgr"})
# Unix socket paths must fit into sockaddr_un.sun_path (108 bytes); Dovecot
# appends names such as "token-login/imap-urlauth" to base_dir.
_MAX_BASE_DIR_LEN = 70
_MAILDIR_FLAG_LETTERS = {
    "\\draft": "D",
    "\\flagged": "F",
    "\\answered": "R",
    "\\seen": "S",
    "\\deleted": "T",
}
_KEYWORD_LETTERS = "abcdefghijklmnopqrstuvwxyz"
_USERNAME_RE = re.compile(r"^[A-Za-z0-9._@-]+$")  # Dovecot's auth_username_chars

# Password lookups go through Dovecot's dict passdb backed by a "file" dict
# rather than the passwd-file driver: passwd-file re-checks its file at most
# once per second, so a password changed right after a login would still be
# accepted for up to a second. The file dict re-opens its file whenever the
# inode changes, which every atomic rewrite guarantees.
_DICT_AUTH_CONF = """\
uri = file:@USERS_FILE@
default_pass_scheme = PLAIN
iterate_disable = yes
key passdb {
  key = passdb/%u
  format = json
}
passdb_objects = passdb
"""

# One (raw message, internal date, IMAP flags and keywords) triple for fill_maildir.
MaildirMessage = tuple[bytes, datetime, Sequence[str]]

# Post-login capability list of each Dovecot binary, learned once per process
# (needed to hide capabilities, see Dovecot._default_capabilities).
_default_capabilities_cache: dict[str, tuple[str, ...]] = {}
# Set once Dovecot is known to be fully installed, to skip re-checking.
_installed_confirmed = False
_cache_lock = threading.Lock()

# Instances still running when the interpreter exits (a test forgot stop(), or
# an exception skipped it) are stopped by an atexit hook so no stray Dovecot
# keeps running. SIGKILL of the test process itself cannot be covered.
_running_instances: set[Dovecot] = set()


@atexit.register
def _stop_leftover_instances() -> None:
    for instance in list(_running_instances):
        with contextlib.suppress(Exception):
            instance.stop(timeout=5.0)


class DovecotError(RuntimeError):
    """The Dovecot instance could not be installed, started or driven."""


# --------------------------------------------------------------------------
# Installation
# --------------------------------------------------------------------------


def _dovecot_is_installed() -> bool:
    """True when the binaries, the package's users and a configured package exist.

    Binaries appear while dpkg is still unpacking and the ``dovecot`` and
    ``dovenull`` users only once the postinst ran, so all three are checked
    to avoid racing an installation that is in progress.
    """
    global _installed_confirmed
    if _installed_confirmed:
        return True
    if not all(os.access(p, os.X_OK) for p in (DOVECOT_BINARY, *_HELPER_BINARIES)):
        return False
    try:
        pwd.getpwnam("dovecot")
        pwd.getpwnam("dovenull")
    except KeyError:
        return False
    if shutil.which("dpkg-query"):
        result = subprocess.run(
            ["dpkg-query", "-W", "-f=${Status}\\n", "dovecot-core", APT_PACKAGE],
            capture_output=True,
            text=True,
            check=False,
        )
        statuses = result.stdout.split("\n")[:2]
        if result.returncode != 0 or any(st != "install ok installed" for st in statuses):
            return False
    _installed_confirmed = True
    return True


def _lock_is_held(path: str) -> bool:
    """Ask the kernel (F_GETLK) whether someone holds apt's/dpkg's fcntl lock.

    F_GETLK only queries: taking the lock ourselves, even briefly, could make a
    concurrent ``apt-get`` without a lock timeout fail.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        query = struct.pack("hhqqi", fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
        answer = fcntl.fcntl(fd, fcntl.F_GETLK, query)
        lock_type: int = struct.unpack("hhqqi", answer)[0]
        return lock_type != fcntl.F_UNLCK
    except OSError:
        return False
    finally:
        os.close(fd)


def _package_manager_running() -> bool:
    """True while apt/dpkg runs: either a lock is held or such a process exists."""
    if any(_lock_is_held(path) for path in _APT_LOCKS):
        return True
    for comm in Path("/proc").glob("[0-9]*/comm"):
        try:
            name = comm.read_text().strip()
        except OSError:
            continue
        if name in _APT_PROCESS_NAMES:
            return True
    return False


def _wait_for_package_manager(deadline: float) -> None:
    while _package_manager_running():
        if time.monotonic() > deadline:
            raise DovecotError("apt/dpkg still busy; gave up waiting for it")
        time.sleep(2.0)


def ensure_dovecot_installed(timeout: float = 300.0) -> str:
    """Return the path of the dovecot binary, installing ``dovecot-imapd`` if needed.

    Another process may be installing it right now (the dev container installs
    it in the background), so while apt/dpkg is busy we wait for it instead of
    starting a competing ``apt-get``, which would just fail on the lock. Once
    Dovecot is installed, unrelated apt activity does not delay anything.
    """
    deadline = time.monotonic() + timeout
    if _dovecot_is_installed():
        return DOVECOT_BINARY
    _wait_for_package_manager(deadline)
    if _dovecot_is_installed():
        return DOVECOT_BINARY

    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    lock_wait = f"DPkg::Lock::Timeout={max(int(deadline - time.monotonic()), 60)}"
    for command in (
        ["apt-get", "-o", lock_wait, "update"],
        ["apt-get", "-o", lock_wait, "install", "-y", "--no-install-recommends", APT_PACKAGE],
    ):
        result = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            # Maybe a concurrent test process won the race for the lock.
            _wait_for_package_manager(deadline)
            if _dovecot_is_installed():
                return DOVECOT_BINARY
            raise DovecotError(
                f"{' '.join(command)} failed ({result.returncode}):\n{result.stderr[-2000:]}"
            )
    if not _dovecot_is_installed():
        raise DovecotError(f"{APT_PACKAGE} installed but {DOVECOT_BINARY} is still missing")
    return DOVECOT_BINARY


def dovecot_version(binary: str = DOVECOT_BINARY) -> str:
    """Return ``dovecot --version`` output, e.g. ``2.3.19.1 (9b53102964)``."""
    result = subprocess.run([binary, "--version"], capture_output=True, text=True, check=True)
    return result.stdout.strip()


# --------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------


def _free_ports(count: int) -> list[int]:
    """Pick ``count`` distinct free loopback ports by binding to port 0.

    The sockets are held until all ports are chosen so the kernel cannot hand
    out the same one twice; another process may still grab one before Dovecot
    binds it, which :meth:`Dovecot.start` handles by retrying.
    """
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((HOST, 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _write_atomically(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace ``path`` in one rename so Dovecot never reads a half-written file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def _read_greeting(host: str, port: int, timeout: float) -> bytes:
    """Connect and return the first line the server sends (the IMAP greeting)."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.settimeout(timeout)
        data = b""
        while b"\n" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
        with contextlib.suppress(OSError):
            sock.sendall(b"x LOGOUT\r\n")
        return data.split(b"\n", 1)[0].rstrip(b"\r")


def _greeting_capabilities(greeting: bytes) -> set[str]:
    """Extract the CAPABILITY list from an ``* OK [CAPABILITY ...]`` greeting."""
    match = re.search(rb"\[CAPABILITY ([^\]]*)\]", greeting)
    if match is None:
        return set()
    return {cap.decode().upper() for cap in match.group(1).split()}


def _virtual_size(raw: bytes) -> int:
    """Size of the message as IMAP sees it: every bare LF counts as CRLF."""
    return len(raw) + raw.count(b"\n") - raw.count(b"\r\n")


def make_tls_files(directory: Path) -> tuple[Path, Path, Path]:
    """Create a throw-away CA and a server certificate for 127.0.0.1/localhost (trustme).

    A separate CA (rather than one self-signed leaf) keeps the chain valid even
    under strict X.509 verification (e.g. Python 3.13's VERIFY_X509_STRICT).
    Returns (ca_file, cert_file, key_file).
    """
    import trustme

    directory.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA(organization_name="mailferry test CA")
    leaf = ca.issue_cert("localhost", HOST)
    ca_file, cert_file, key_file = directory / "ca.pem", directory / "server.pem", directory / "server.key"
    _write_atomically(ca_file, ca.cert_pem.bytes(), 0o644)
    _write_atomically(cert_file, b"".join(blob.bytes() for blob in leaf.cert_chain_pems), 0o644)
    _write_atomically(key_file, leaf.private_key_pem.bytes(), 0o600)
    return ca_file, cert_file, key_file


# --------------------------------------------------------------------------
# The server
# --------------------------------------------------------------------------


class Dovecot:
    """One private Dovecot IMAP server; use as a context manager or start()/stop().

    ``capabilities_hidden`` removes capabilities (e.g. ``["CONDSTORE",
    "QRESYNC"]``) from what the server announces, to exercise the client's
    fallbacks for servers without them. Dovecot 2.3 only knows a complete
    ``imap_capability`` list, so the default list is learned once per process
    from a throw-away login and the instance is then restarted with the
    reduced list. NOTE: Dovecot 2.3 still *accepts* the hidden extensions if a client
    uses them anyway (``ENABLE CONDSTORE``, ``SELECT ... (CONDSTORE)``,
    ``CHANGEDSINCE``); only the announcement changes.

    ``ssl=True`` serves implicit TLS on :attr:`ssl_port` and STARTTLS on
    :attr:`port`, with a certificate for 127.0.0.1/localhost signed by a
    private CA found at :attr:`ca_file`. Plaintext LOGIN without TLS is always
    allowed so most tests need no TLS at all.

    Users log in with exactly the name given to :meth:`add_user` (no
    lower-casing); passwords are kept in a file that Dovecot re-reads after
    every change, so :meth:`set_password` takes effect for the very next login.
    Folder names use ``/`` as hierarchy separator (Maildir ``LAYOUT=fs``).

    ``courier_namespace=True`` shows the folders as Courier-IMAP does: one namespace with the
    prefix ``INBOX.`` and the separator ``.`` (INBOX, INBOX.Sent, INBOX.Sent.2024; NAMESPACE
    answers ``(("INBOX." "."))``), and no SPECIAL-USE attributes on any folder (RFC 6154: a
    client must then find Sent and Trash by name). The capability itself is still announced;
    hide it with ``capabilities_hidden=["SPECIAL-USE"]`` for a closer match. On disk the mail
    stays in ``LAYOUT=fs``: "INBOX.A.B" is ``Maildir/A/B``. See also
    :meth:`rename_folder_with_new_uidvalidity`.
    """

    def __init__(
        self,
        base_dir: str | os.PathLike[str],
        *,
        capabilities_hidden: Sequence[str] = (),
        ssl: bool = False,
        binary: str | None = None,
        start_timeout: float = 20.0,
        max_connections_per_user: int = 1000,
        courier_namespace: bool = False,
        oauth2_introspection_url: str | None = None,
        oauth2_mechanisms: Sequence[str] = ("xoauth2", "oauthbearer"),
        oauth2_app_introspection_url: str | None = None,
    ) -> None:
        self.base_dir = Path(base_dir).resolve()
        self.capabilities_hidden: tuple[str, ...] = tuple(c.upper() for c in capabilities_hidden)
        self.ssl = ssl
        self.binary = binary
        self.start_timeout = start_timeout
        self.max_connections_per_user = max_connections_per_user
        self.courier_namespace = courier_namespace
        # OAuth2: XOAUTH2 and OAUTHBEARER logins, each token checked against this RFC 7662
        # introspection endpoint (devkit.oauth_provider); passwords keep working beside them.
        self.oauth2_introspection_url = oauth2_introspection_url
        self.oauth2_mechanisms = " ".join(oauth2_mechanisms)
        self.oauth2_config = self.base_dir / "dovecot-oauth2.conf.ext"
        # App-only tokens (Microsoft's client credentials grant): a token for an application,
        # not for a user. Dovecot 2.3 sends an introspection endpoint nothing but the token, so
        # it cannot ask "may this app open this mailbox?": a second oauth2 passdb asks this
        # endpoint (which calls only app tokens active, with the username "APP@TENANT-DOMAIN")
        # and accepts the token for every user of that domain (username_format = %Ld), as
        # Exchange Online accepts it for the tenant's mailboxes the app was given access to.
        self.oauth2_app_introspection_url = oauth2_app_introspection_url
        self.oauth2_app_config = self.base_dir / "dovecot-oauth2-app.conf.ext"
        # What a client sees: folder "Sent" is "INBOX.Sent" in the Courier-like namespace.
        self.namespace_prefix = "INBOX." if courier_namespace else ""
        self.separator = "." if courier_namespace else "/"

        self.config_file = self.base_dir / "dovecot.conf"
        self.users_file = self.base_dir / "users.dict"
        self.mail_dir = self.base_dir / "mail"
        self.state_dir = self.base_dir / "state"
        self.log_file = self.base_dir / "dovecot.log"
        self.master_output_file = self.base_dir / "master.out"
        self.tls_dir = self.base_dir / "tls"
        self.dict_auth_config = self.base_dir / "dict-auth.conf.ext"

        self._users: dict[str, str] = {}
        self._users_lock = threading.RLock()
        self._maildir_counter = 0
        self._log_offset = 0
        self._process: subprocess.Popen[bytes] | None = None
        self._run_dir: Path | None = None
        self._short_run_dir = False
        self._port: int | None = None
        self._ssl_port: int | None = None
        self._ca_file: Path | None = None
        self._cert_file: Path | None = None
        self._key_file: Path | None = None
        self._instance_name = f"mailferry-{os.getpid()}-{os.urandom(3).hex()}"

        self._as_root = os.geteuid() == 0
        self._mail_owner: tuple[int, int] | None = None

    # -- properties -------------------------------------------------------

    @property
    def _mail_uid(self) -> int:
        return self._resolve_mail_owner()[0]

    @property
    def _mail_gid(self) -> int:
        return self._resolve_mail_owner()[1]

    def _resolve_mail_owner(self) -> tuple[int, int]:
        """Uid/gid that owns the mail files, resolved lazily.

        As root this is the package's ``dovecot`` user (Dovecot refuses mail
        access as uid 0; the user only ever works inside the mail chroot), so
        Dovecot must be installed first - hence not done in ``__init__``.
        """
        if self._mail_owner is None:
            if self._as_root:
                if self.binary is None:
                    self.binary = ensure_dovecot_installed()
                mail_user = pwd.getpwnam("dovecot")
                self._mail_owner = (mail_user.pw_uid, mail_user.pw_gid)
            else:
                self._mail_owner = (os.geteuid(), os.getegid())
        return self._mail_owner

    @property
    def host(self) -> str:
        """Address the server listens on (loopback only)."""
        return HOST

    @property
    def port(self) -> int:
        """Plain IMAP port (STARTTLS is offered there when ``ssl=True``)."""
        if self._port is None:
            raise DovecotError("Dovecot instance is not started")
        return self._port

    @property
    def ssl_port(self) -> int | None:
        """Implicit-TLS IMAP port, or None when the instance has no TLS."""
        return self._ssl_port

    @property
    def ca_file(self) -> Path | None:
        """PEM file of the CA that signed the server certificate (``ssl=True``)."""
        return self._ca_file

    @property
    def running(self) -> bool:
        """True while the master process is alive."""
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        """PID of the Dovecot master process, when running."""
        return self._process.pid if self._process is not None else None

    # -- context manager ---------------------------------------------------

    def __enter__(self) -> Dovecot:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"port={self._port}" if self.running else "stopped"
        return f"<Dovecot {self.base_dir} {state}>"

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> None:
        """Write the configuration, start the master and wait for the greeting.

        Fresh free ports are chosen on the first start; if another process
        steals one before Dovecot binds it, we retry with new ports. A start
        after :meth:`stop` reuses the previous ports, like :meth:`restart`.
        """
        if self.running:
            return
        if self.binary is None:
            self.binary = ensure_dovecot_installed()
        self._prepare_directories()
        if self.ssl and self._ca_file is None:
            self._ca_file, self._cert_file, self._key_file = make_tls_files(self.tls_dir)

        keep_ports = self._port is not None  # restart: clients expect the same ports
        attempts = 1 if keep_ports else 5
        for attempt in range(attempts):
            if not keep_ports:
                ports = _free_ports(2 if self.ssl else 1)
                self._port = ports[0]
                self._ssl_port = ports[1] if self.ssl else None
            try:
                self._launch(self._cached_capability_list())
                _running_instances.add(self)
                break
            except DovecotError as error:
                if "Address already in use" in str(error) and attempt < attempts - 1:
                    continue
                raise

        if self.capabilities_hidden:
            self._apply_hidden_capabilities()

    def _start_fresh(self) -> None:
        """Start on the current ports (used to restart with a new config)."""
        self._prepare_directories()
        self._launch(self._cached_capability_list())
        _running_instances.add(self)

    def stop(self, timeout: float = 15.0) -> None:
        """Stop the master (SIGTERM, it shuts its children down) and wait for it.

        After SIGTERM the master keeps its log process alive and then often
        idles for about a second before exiting. Once every other child is
        gone nothing is left to shut down cleanly, so we end the log process
        and, shortly after, the master itself: stop() takes ~0.1 s instead of
        1.1 s, which adds up over a test suite.
        """
        process = self._process
        if process is not None:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                self._wait_for_exit(process, timeout)
            self._process = None
        _running_instances.discard(self)
        if self._short_run_dir and self._run_dir is not None:
            shutil.rmtree(self._run_dir, ignore_errors=True)
            self._run_dir = None
            self._short_run_dir = False

    @staticmethod
    def _wait_for_exit(process: subprocess.Popen[bytes], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        children_gone_at: float | None = None
        while process.poll() is None:
            now = time.monotonic()
            if now > deadline or (children_gone_at is not None and now > children_gone_at + 0.1):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=5)
                return
            if children_gone_at is None:
                children = _process_group_members(process.pid) - {process.pid}
                names = {pid: _process_name(pid) for pid in children}
                # "" = a child so far into exiting that its cmdline is gone.
                if all(name.endswith("/log") or not name for name in names.values()):
                    for pid, name in names.items():
                        if name:
                            with contextlib.suppress(ProcessLookupError):
                                os.kill(pid, signal.SIGTERM)
                    children_gone_at = now
            time.sleep(0.01)

    def restart(self) -> None:
        """Stop and start again on the same ports (mail and users are kept)."""
        self.stop()
        self._start_fresh()

    def log_tail(self, lines: int = 40) -> str:
        """Last lines of the Dovecot log and the master's own output, for errors."""
        parts: list[str] = []
        for path in (self.log_file, self.master_output_file):
            with contextlib.suppress(OSError):
                text = path.read_text(errors="replace").splitlines()[-lines:]
                if text:
                    parts.append(f"--- {path} ---\n" + "\n".join(text))
        return "\n".join(parts) or "(no Dovecot log output)"

    # -- users -------------------------------------------------------------

    def add_user(self, name: str, password: str) -> None:
        """Create (or replace) an IMAP user; works while the server is running."""
        self._check_username(name)
        home = self.mail_dir / name
        home.mkdir(parents=True, exist_ok=True)
        self._chown(home)
        with self._users_lock:
            self._users[name] = password
            self._write_users_file()

    def set_password(self, name: str, password: str) -> None:
        """Change a password; the next login must use it (no restart needed)."""
        with self._users_lock:
            if name not in self._users:
                raise KeyError(name)
            self._users[name] = password
            self._write_users_file()

    def remove_user(self, name: str, *, delete_mail: bool = False) -> None:
        """Remove a user so new logins fail; keeps the Maildir unless asked not to."""
        with self._users_lock:
            self._users.pop(name)
            self._write_users_file()
        if delete_mail:
            shutil.rmtree(self.mail_dir / name, ignore_errors=True)

    def password(self, name: str) -> str:
        """Current password of ``name`` (handy for fixtures and helpers)."""
        return self._users[name]

    @property
    def users(self) -> dict[str, str]:
        """Snapshot of all users and their passwords."""
        with self._users_lock:
            return dict(self._users)

    # -- IMAP conveniences --------------------------------------------------

    def ssl_context(self) -> ssl_module.SSLContext:
        """A client SSL context trusting only this instance's private CA."""
        if self._ca_file is None:
            raise DovecotError("instance was created without ssl=True")
        return ssl_module.create_default_context(cafile=str(self._ca_file))

    def client(
        self,
        user: str,
        password: str | None = None,
        *,
        tls: bool = False,
        starttls: bool = False,
        timeout: float = 10.0,
    ) -> IMAPClient:
        """An IMAPClient already logged in as ``user``.

        ``password`` defaults to the user's current password. ``tls`` connects
        to :attr:`ssl_port` with implicit TLS, ``starttls`` upgrades the plain
        connection; both verify the certificate against :attr:`ca_file`.
        """
        if password is None:
            password = self._users[user]
        if tls:
            if self._ssl_port is None:
                raise DovecotError("instance was created without ssl=True")
            client = IMAPClient(
                self.host,
                self._ssl_port,
                ssl=True,
                ssl_context=self.ssl_context(),
                timeout=timeout,
            )
        else:
            client = IMAPClient(self.host, self.port, ssl=False, timeout=timeout)
        try:
            if starttls and not tls:
                client.starttls(self.ssl_context())
            client.login(user, password)
        except BaseException:
            with contextlib.suppress(Exception):
                client.shutdown()
            raise
        return client

    @contextlib.contextmanager
    def session(self, user: str, password: str | None = None) -> Iterator[IMAPClient]:
        """Context manager around :meth:`client` that logs out afterwards."""
        client = self.client(user, password)
        try:
            yield client
        finally:
            with contextlib.suppress(Exception):
                client.logout()

    def create_folder(self, user: str, folder: str) -> None:
        """Create ``folder`` (and its parents) via IMAP, ignoring "already exists"."""
        with self.session(user) as client:
            if not client.folder_exists(folder):
                client.create_folder(folder)

    def imap_name(self, folder: str) -> str:
        """The name a client sees: "Sent" is "INBOX.Sent" with ``courier_namespace``."""
        prefix = self.namespace_prefix
        if not prefix or folder.upper() == "INBOX" or folder.upper().startswith(prefix.upper()):
            return folder
        return prefix + folder

    def rename_folder_with_new_uidvalidity(self, user: str, old: str, new: str) -> tuple[int, int]:
        """Rename ``old`` (and its subfolders) to ``new`` as Courier-IMAP does; returns the
        (old, new) UIDVALIDITY of the folder.

        Courier renames a folder by moving its Maildir, and the folder comes back with a new
        UIDVALIDITY: a client must treat every UID it knew there as void (RFC 3501 2.3.1.1)
        although the messages are the same. Dovecot's RENAME keeps UIDVALIDITY, so this models
        Courier's instead: CREATE the new folder (Dovecot gives each new folder of a user a
        UIDVALIDITY never used before), UID COPY every message over (COPY keeps the flags,
        keywords and internal date, RFC 3501 6.4.7; Dovecot's maildir hard-links the very
        files), then DELETE the old one. Names are IMAP names (``INBOX.Sent`` in the
        Courier-like namespace); \\Recent is not carried over, as it never is.
        """
        if old.upper() == "INBOX":
            raise ValueError("INBOX cannot be renamed this way")
        with self.session(user) as client:
            below = old + self.separator
            children = sorted(
                (name, new + name[len(old):])
                for _, _, name in client.list_folders(below, "*")
                if name.startswith(below)
            )
            moves = [(old, new), *children]
            old_uidvalidity = int(client.folder_status(old, [b"UIDVALIDITY"])[b"UIDVALIDITY"])
            for source, target in moves:  # parents first
                if client.folder_exists(target):
                    raise DovecotError(f"{target!r} already exists")
                client.create_folder(target)
                client.select_folder(source, readonly=True)
                uids = client.search(["ALL"])
                if uids:
                    client.copy(uids, target)
                client.unselect_folder()
            for source, _ in reversed(moves):  # children first
                client.delete_folder(source)
            new_uidvalidity = int(client.folder_status(new, [b"UIDVALIDITY"])[b"UIDVALIDITY"])
        if new_uidvalidity == old_uidvalidity:
            raise DovecotError(f"{new!r} kept UIDVALIDITY {old_uidvalidity} after the copy")
        return old_uidvalidity, new_uidvalidity

    def append(
        self,
        user: str,
        password: str | None,
        folder: str,
        raw: bytes,
        flags: Sequence[str] = (),
        when: datetime | None = None,
    ) -> int | None:
        """APPEND one message via IMAP; returns its UID (from APPENDUID) if known.

        ``password`` None means the user's current password. ``when`` becomes
        the INTERNALDATE (naive datetimes are local time, as in imapclient).
        """
        client = self.client(user, password)
        try:
            response = client.append(folder, raw, flags=tuple(flags), msg_time=when)
        finally:
            with contextlib.suppress(Exception):
                client.logout()
        match = re.search(rb"APPENDUID \d+ (\d+)", response or b"")
        return int(match.group(1)) if match else None

    # -- direct Maildir access -----------------------------------------------

    def maildir_path(self, user: str, folder: str) -> Path:
        """Directory holding ``folder`` of ``user`` on disk.

        INBOX is the Maildir root; with ``LAYOUT=fs`` folder "A/B" (or
        "INBOX.A.B" with ``courier_namespace``, the prefix being optional here) is
        ``Maildir/A/B``; non-ASCII names are stored in modified UTF-7.
        """
        root = self.mail_dir / user / "Maildir"
        if folder.upper() == "INBOX":
            return root
        prefix = self.namespace_prefix
        if prefix and folder[: len(prefix)].upper() == prefix.upper():
            folder = folder[len(prefix):]
        encoded = imap_utf7.encode(folder).decode("ascii")
        return root.joinpath(*[part for part in encoded.split(self.separator) if part])

    def fill_maildir(
        self,
        user: str,
        folder: str,
        messages: Iterable[MaildirMessage],
    ) -> int:
        """Write messages straight into the Maildir; returns how many were written.

        Meant for benchmarks (20,000 messages take seconds instead of minutes of
        APPENDs). Each message is ``(raw, internal_date, flags)`` where flags
        are IMAP system flags (``\\Seen``, ``\\Answered``, ``\\Flagged``,
        ``\\Deleted``, ``\\Draft``) or keywords (at most 26 per folder).
        The file's mtime is set to the internal date, which Dovecot reports as
        INTERNALDATE (naive datetimes are local time, as ``datetime.timestamp``
        assumes). UIDs are assigned by Dovecot on its next sync, in directory
        order rather than iteration order; sessions that have the folder
        selected see the messages after their next NOOP/IDLE wake-up.

        A missing folder is created first: via IMAP CREATE (with the user's
        stored password) while the server runs, otherwise as bare Maildir
        directories (``cur``/``new``/``tmp``, owned by the mail user), which
        Dovecot picks up on its next folder listing. With ``LAYOUT=fs`` folder
        "A/B" is the directory ``mail/<user>/Maildir/A/B``.
        """
        directory = self.maildir_path(user, folder)
        if not (directory / "cur").is_dir():
            if self.running:
                self.create_folder(user, self.imap_name(folder))
            self._make_maildir(directory)

        keywords = self._read_keywords(directory)
        keywords_written = dict(keywords)
        hostname = socket.gethostname().replace("/", "\\057").replace(":", "\\072")
        pid = os.getpid()
        tmp_dir, cur_dir = directory / "tmp", directory / "cur"
        count = 0
        for raw, when, flags in messages:
            letters = self._maildir_letters(flags, keywords)
            timestamp = when.timestamp()
            self._maildir_counter += 1
            seconds = int(timestamp)
            base_name = (
                f"{seconds}.M{int(time.time() * 1e6) % 1_000_000}P{pid}"
                f"Q{self._maildir_counter}R{os.urandom(4).hex()}.{hostname}"
                f",S={len(raw)},W={_virtual_size(raw)}"
            )
            tmp_path = tmp_dir / base_name
            fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                _write_all(fd, raw)
                if self._as_root:
                    os.fchown(fd, self._mail_uid, self._mail_gid)
                os.utime(fd, (timestamp, timestamp))
            finally:
                os.close(fd)
            if keywords != keywords_written:
                # Before the message becomes visible: Dovecot must never see
                # a keyword letter it cannot map.
                self._write_keywords(directory, keywords)
                keywords_written = dict(keywords)
            os.rename(tmp_path, cur_dir / f"{base_name}:2,{letters}")
            count += 1
        return count

    def _make_maildir(self, directory: Path) -> None:
        """Create ``directory`` (and parents) with cur/new/tmp, owned by the mail user."""
        missing = [p for p in (directory, *directory.parents) if not p.exists()]
        for path in reversed(missing):
            path.mkdir(mode=0o700)
            self._chown(path)
        for sub in ("cur", "new", "tmp"):
            path = directory / sub
            if not path.is_dir():
                path.mkdir(mode=0o700)
                self._chown(path)

    # -- internals: configuration --------------------------------------------

    def _prepare_directories(self) -> None:
        """Create the private directory tree with ownerships Dovecot accepts."""
        for path in (self.base_dir, self.state_dir):
            path.mkdir(parents=True, exist_ok=True)
        self.mail_dir.mkdir(parents=True, exist_ok=True)
        self._chown(self.mail_dir)
        if not self.users_file.exists():
            self._write_users_file()

        run_dir = self.base_dir / "run"
        if len(str(run_dir)) <= _MAX_BASE_DIR_LEN:
            run_dir.mkdir(exist_ok=True)
            self._run_dir, self._short_run_dir = run_dir, False
        elif self._run_dir is None or not self._run_dir.exists():
            self._run_dir = Path(tempfile.mkdtemp(prefix="mf-dovecot-", dir="/tmp"))
            self._short_run_dir = True
            with contextlib.suppress(OSError):  # breadcrumb for humans debugging
                link = self.base_dir / "run"
                if link.is_symlink():
                    link.unlink()
                link.symlink_to(self._run_dir)

    def _chown(self, path: Path) -> None:
        """Hand mail directories to the unprivileged mail user (root only)."""
        if self._as_root:
            os.chown(path, self._mail_uid, self._mail_gid)

    def _render_config(self, capability_list: Sequence[str] | None) -> str:
        """Build dovecot.conf; ``capability_list`` replaces the default CAPABILITY."""
        assert self._run_dir is not None
        mail_user = pwd.getpwuid(self._mail_uid).pw_name
        mail_group = grp.getgrgid(self._mail_gid).gr_name
        if self._as_root:
            identity = f"""\
default_internal_user = root
default_internal_group = root
default_login_user = dovenull
mail_uid = {mail_user}
mail_gid = {mail_group}
first_valid_uid = {self._mail_uid}
first_valid_gid = {self._mail_gid}
# Mail processes chroot into the mail dir, so they never traverse the
# (possibly 0700) parents of the base directory as the unprivileged user.
valid_chroot_dirs = {self.mail_dir}
"""
            home = f"{self.mail_dir}/./%u"
            chroots = ""
        else:
            identity = f"""\
default_internal_user = {mail_user}
default_internal_group = {mail_group}
default_login_user = {mail_user}
first_valid_uid = {self._mail_uid}
first_valid_gid = {self._mail_gid}
"""
            home = f"{self.mail_dir}/%u"
            chroots = """\
service anvil {
  chroot =
}
"""
        if self.ssl:
            assert self._cert_file is not None and self._key_file is not None
            ssl_settings = f"""\
ssl = yes
ssl_cert = <{self._cert_file}
ssl_key = <{self._key_file}
"""
        else:
            ssl_settings = "ssl = no\n"
        capability = f"imap_capability = {' '.join(capability_list)}\n" if capability_list else ""
        login_chroot = "" if self._as_root else "  chroot =\n"
        special_use = "".join(
            f"  mailbox {name} {{\n    special_use = \\{name}\n    auto = no\n  }}\n"
            for name in ("Sent", "Drafts", "Trash", "Junk")
            if not self.courier_namespace  # Courier-IMAP has no SPECIAL-USE
        )
        return f"""\
# Generated by devkit/dovecot.py - private test instance, do not edit.
instance_name = {self._instance_name}
base_dir = {self._run_dir}
state_dir = {self.state_dir}
log_path = {self.log_file}
info_log_path = {self.log_file}
debug_log_path = {self.log_file}
protocols = imap
listen = {HOST}
shutdown_clients = yes

{identity}
{ssl_settings}
disable_plaintext_auth = no
auth_mechanisms = plain login{" " + self.oauth2_mechanisms if self.oauth2_introspection_url else ""}
auth_username_format = %u
auth_verbose = yes
# Fail wrong passwords fast (Dovecot's granularity is 0.5 s anyway).
auth_failure_delay = 0
{capability}
mail_location = maildir:~/Maildir:LAYOUT=fs
mail_fsync = never
mail_max_userip_connections = {self.max_connections_per_user}

passdb {{
  driver = dict
  mechanisms = plain login
  args = {self.dict_auth_config}
}}
{self._oauth2_passdb()}userdb {{
  driver = static
  args = uid={self._mail_uid} gid={self._mail_gid} home={home}
}}

namespace inbox {{
  inbox = yes
  separator = {self.separator}
  prefix = {self.namespace_prefix}
{special_use}}}

service imap-login {{
  inet_listener imap {{
    address = {HOST}
    port = {self._port}
  }}
  inet_listener imaps {{
    address = {HOST}
    port = {self._ssl_port or 0}
    ssl = yes
  }}
  # One long-lived login process for all clients: fast logins in benchmarks.
  service_count = 0
  process_min_avail = 1
{login_chroot}}}
service imap {{
  process_limit = 1024
}}
service anvil {{
  # No brute-force penalty: tests fail logins on purpose, repeatedly.
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
}}
{chroots}"""

    def _oauth2_passdb(self) -> str:
        if not self.oauth2_introspection_url:
            return ""
        passdb = f"""passdb {{
  driver = oauth2
  mechanisms = {self.oauth2_mechanisms}
  args = {self.oauth2_config}
}}
"""
        if self.oauth2_app_introspection_url:  # tried when the first one refused the token
            passdb += f"""passdb {{
  driver = oauth2
  mechanisms = {self.oauth2_mechanisms}
  args = {self.oauth2_app_config}
}}
"""
        return passdb

    def _write_config(self, capability_list: Sequence[str] | None) -> None:
        dict_config = _DICT_AUTH_CONF.replace("@USERS_FILE@", str(self.users_file))
        _write_atomically(self.dict_auth_config, dict_config.encode(), 0o600)
        if self.oauth2_introspection_url:
            # Dovecot 2.3's oauth2 passdb: every login POSTs token=... to the introspection
            # URL; the token is accepted while "active" is true and "username" is the user
            # logging in.
            _write_atomically(self.oauth2_config, (
                f"introspection_mode = post\n"
                f"introspection_url = {self.oauth2_introspection_url}\n"
                f"force_introspection = yes\n"
                f"username_attribute = username\n"
                f"active_attribute = active\n"
                f"active_value = true\n").encode(), 0o600)
        if self.oauth2_introspection_url and self.oauth2_app_introspection_url:
            # Only the domains are compared: the SASL user's and the introspected username's.
            _write_atomically(self.oauth2_app_config, (
                f"introspection_mode = post\n"
                f"introspection_url = {self.oauth2_app_introspection_url}\n"
                f"force_introspection = yes\n"
                f"username_attribute = username\n"
                f"username_format = %Ld\n"
                f"active_attribute = active\n"
                f"active_value = true\n").encode(), 0o600)
        _write_atomically(self.config_file, self._render_config(capability_list).encode(), 0o644)

    def _write_users_file(self) -> None:
        """Rewrite the users file (Dovecot "file" dict format) in one atomic rename.

        The file alternates key and value lines; the value is the JSON object
        of passdb fields. Passwords are stored as ``{PLAIN.b64}`` so any
        character is safe. The new inode makes Dovecot re-read the file on the
        very next login (see :data:`_DICT_AUTH_CONF`).
        """
        with self._users_lock:
            lines = []
            for name, pw in sorted(self._users.items()):
                encoded = base64.b64encode(pw.encode()).decode()
                fields = json.dumps({"password": f"{{PLAIN.b64}}{encoded}"})
                lines.append(f"shared/passdb/{name}\n{fields}\n")
            _write_atomically(self.users_file, "".join(lines).encode(), 0o600)

    @staticmethod
    def _check_username(name: str) -> None:
        if not _USERNAME_RE.match(name) or name in {".", ".."}:
            raise ValueError(f"unsupported IMAP user name {name!r} (use [A-Za-z0-9._@-])")

    # -- internals: process -------------------------------------------------

    def _launch(self, capability_list: Sequence[str] | None) -> None:
        """Start the master in the foreground (so we own its PID) and await greeting."""
        assert self.binary is not None
        self._write_config(capability_list)
        self._log_offset = self.log_file.stat().st_size if self.log_file.exists() else 0
        with open(self.master_output_file, "ab") as output:
            self._process = subprocess.Popen(
                [self.binary, "-F", "-c", str(self.config_file)],
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C in pytest must not hit it first
            )
        try:
            self._wait_for_greeting(self.port, self.start_timeout)
            if self._ssl_port is not None:
                self._wait_for_port(self._ssl_port, self.start_timeout)
        except BaseException:
            self.stop()
            raise

    def _fail(self, message: str) -> DovecotError:
        return DovecotError(f"{message}\n{self.log_tail()}")

    def _wait_for_greeting(self, port: int, timeout: float) -> bytes:
        deadline = time.monotonic() + timeout
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            if self._process is None or self._process.poll() is not None:
                code = None if self._process is None else self._process.returncode
                raise self._fail(f"Dovecot exited during start-up (exit code {code})")
            fatal = self._fatal_log_line()
            if fatal is not None:
                # e.g. a broken auth config: the master keeps restarting the
                # service and clients would just hang, so fail right away.
                raise self._fail(f"Dovecot reported a fatal error: {fatal}")
            try:
                greeting = _read_greeting(self.host, port, timeout=2.0)
            except OSError as error:
                last_error = error
                time.sleep(0.05)
                continue
            if greeting.startswith(b"* OK"):
                return greeting
            last_error = DovecotError(f"unexpected greeting {greeting!r}")
            time.sleep(0.05)
        raise self._fail(
            f"no IMAP greeting on {self.host}:{port} within {timeout:.0f}s ({last_error})"
        )

    def _fatal_log_line(self) -> str | None:
        """First "Fatal:" line logged since the last launch, if any."""
        try:
            with open(self.log_file, "rb") as log:
                log.seek(self._log_offset)
                new_text = log.read().decode(errors="replace")
        except OSError:
            return None
        for line in new_text.splitlines():
            if "Fatal:" in line:
                return line
        return None

    def _wait_for_port(self, port: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with socket.create_connection((self.host, port), timeout=2.0):
                    return
            except OSError as error:
                if time.monotonic() > deadline:
                    raise self._fail(f"port {port} not accepting within {timeout:.0f}s") from error
                time.sleep(0.05)

    # -- internals: capabilities -----------------------------------------------

    def _cached_capability_list(self) -> list[str] | None:
        """The reduced CAPABILITY list, if already known, to start with directly."""
        if not self.capabilities_hidden:
            return None
        with _cache_lock:
            defaults = _default_capabilities_cache.get(self._cache_key())
        if defaults is None:
            return None
        return [c for c in defaults if c.upper() not in self.capabilities_hidden]

    def _cache_key(self) -> str:
        return f"{self.binary}:{self.ssl}"

    def _apply_hidden_capabilities(self) -> None:
        """Make the running instance announce the default list minus the hidden ones.

        Dovecot 2.3 has no "-CAP" syntax: ``imap_capability`` either appends
        (``+CAP``) or replaces the whole list, and the default list depends on
        the build. So the first such instance of a process logs in once to
        read it and restarts with the reduced list (a SIGHUP reload is not
        enough: the long-lived login process keeps accepting connections and
        hands them to the already-stopped old imap service for a moment).
        """
        if self._cached_capability_list() is None:
            defaults = self._probe_default_capabilities()
            with _cache_lock:
                _default_capabilities_cache[self._cache_key()] = defaults
            self.stop()
            self._start_fresh()
        greeting = self._wait_for_greeting(self.port, self.start_timeout)
        announced = _greeting_capabilities(greeting)
        # With an explicit list the pre-login greeting shows the full list.
        if "IMAP4REV1" not in announced or announced & set(self.capabilities_hidden):
            raise self._fail(f"hidden capabilities are still announced: {greeting!r}")

    def _probe_default_capabilities(self) -> tuple[str, ...]:
        """Log in as a temporary user and return the post-login CAPABILITY list."""
        probe_user = f"capability-probe-{os.urandom(4).hex()}"
        probe_password = os.urandom(12).hex()
        self.add_user(probe_user, probe_password)
        try:
            client = IMAPClient(self.host, self.port, ssl=False, timeout=10)
            try:
                client.login(probe_user, probe_password)
                typ, data = client._imap.capability()
            finally:
                with contextlib.suppress(Exception):
                    client.logout()
        finally:
            self.remove_user(probe_user, delete_mail=True)
        if typ != "OK" or not data or not data[-1]:
            raise self._fail(f"CAPABILITY probe failed: {typ} {data!r}")
        capabilities = data[-1].decode().split()
        # The login process adds these itself; they must not be in the list.
        login_only = {"STARTTLS", "LOGINDISABLED"}
        return tuple(
            c
            for c in capabilities
            if not c.upper().startswith("AUTH=") and c.upper() not in login_only
        )

    # -- internals: Maildir ---------------------------------------------------

    @staticmethod
    def _maildir_letters(flags: Sequence[str], keywords: dict[str, str]) -> str:
        """Maildir info letters for IMAP flags; new keywords get the next free letter."""
        letters: set[str] = set()
        for flag in flags:
            lowered = flag.lower()
            if lowered in _MAILDIR_FLAG_LETTERS:
                letters.add(_MAILDIR_FLAG_LETTERS[lowered])
            elif lowered == "\\recent":
                continue
            elif flag.startswith("\\"):
                raise ValueError(f"unknown system flag {flag!r}")
            else:
                letter = keywords.get(flag)
                if letter is None:
                    used = set(keywords.values())
                    free = [c for c in _KEYWORD_LETTERS if c not in used]
                    if not free:
                        raise ValueError("a Maildir folder supports at most 26 keywords")
                    letter = keywords[flag] = free[0]
                letters.add(letter)
        return "".join(sorted(letters))

    @staticmethod
    def _read_keywords(directory: Path) -> dict[str, str]:
        """Parse ``dovecot-keywords`` ("<index> <keyword>" lines) into keyword->letter."""
        keywords: dict[str, str] = {}
        with contextlib.suppress(FileNotFoundError):
            for line in (directory / "dovecot-keywords").read_text().splitlines():
                index, _, name = line.partition(" ")
                if index.isdigit() and name and int(index) < len(_KEYWORD_LETTERS):
                    keywords[name] = _KEYWORD_LETTERS[int(index)]
        return keywords

    def _write_keywords(self, directory: Path, keywords: dict[str, str]) -> None:
        lines = sorted((_KEYWORD_LETTERS.index(letter), name) for name, letter in keywords.items())
        path = directory / "dovecot-keywords"
        _write_atomically(path, "".join(f"{i} {name}\n" for i, name in lines).encode(), 0o600)
        self._chown(path)


def _process_group_members(pgid: int) -> set[int]:
    """PIDs in process group ``pgid`` (Linux /proc; the master leads its own group)."""
    members: set[int] = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        # After "pid (comm)": state ppid pgrp ...; zombies are already gone for us.
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] != "Z":
            members.add(int(stat.parent.name))
    return members


def _process_name(pid: int) -> str:
    """The process title Dovecot sets, e.g. "dovecot-<instance>/log"."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
    except OSError:
        return ""


def _write_all(fd: int, data: bytes) -> None:
    """os.write may write less than asked for large buffers; loop until done."""
    view = memoryview(data)
    while view:
        try:
            written = os.write(fd, view)
        except InterruptedError:
            continue
        except OSError as error:
            if error.errno == errno.EINTR:
                continue
            raise
        view = view[written:]
