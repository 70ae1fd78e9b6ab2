"""A fake OAuth2 identity provider on 127.0.0.1, for tests: what Google or Microsoft would be.

It serves, over plain HTTP on loopback (allowed by mailferry for loopback only):

- ``/authorize``: the authorization endpoint; it consents at once for the user named by
  :attr:`FakeProvider.consenting_user` and redirects to ``redirect_uri`` with a code;
- ``/token``: ``authorization_code`` (PKCE S256 checked, RFC 7636), ``refresh_token`` (rotated
  when :attr:`rotate` is set), ``client_credentials`` and the JWT bearer grant (RFC 7523, the
  assertion verified with the registered public key), and the device-code grant (RFC 8628);
- ``/device``: device authorization (approved at once for :attr:`consenting_user`);
- ``/introspect``: RFC 7662 introspection, what Dovecot's oauth2 passdb asks
  (``introspection_mode = post``): ``username`` is the user a token acts for;
- ``/introspect/app``: the same for app-only tokens only (see below);
- ``/userinfo``: the bearer's ``email``.

Access tokens last :attr:`access_lifetime` seconds (a few). :meth:`fail_next` makes the token
endpoint answer ``invalid_grant``, 429 with Retry-After, 500, slowly, or not until the test
calls :meth:`release` (``hold``: to make other processes ask while a refresh is in flight);
:meth:`revoke` revokes a user's grants. Every request is counted in :attr:`requests` by grant
type, and every ``refresh_token`` grant in :attr:`refreshes` by the refresh token it presented
(a count above one: the same refresh token was used twice).

Whom a token acts for, and how Dovecot (devkit.dovecot, 2.3's oauth2 passdb) checks it: Dovecot
posts the token, and only the token, to the introspection endpoint, and accepts the login when
the answer's ``username`` equals the SASL user (``username_format``, ``%Lu`` by default).

- Tokens of a person (authorization code, device code, refresh token) act for that person.
- A Google service account's JWT bearer grant (RFC 7523) acts for the user its assertion's
  ``sub`` claim names (domain-wide delegation): introspected as that user, like Google's
  tokeninfo answers the impersonated user's email.
- Microsoft's client credentials grant gives a token for the *application*, with no user in it;
  Exchange Online accepts it for any mailbox the app was given access to, the one named in the
  XOAUTH2/OAUTHBEARER ``user=``. The introspection cannot see that name, so: ``/introspect``
  answers the app token with ``username`` = the client id (RFC 7662: the resource owner of a
  client credentials token is the client itself), which matches no mailbox; and
  ``/introspect/app`` calls only app tokens active, with ``username`` =
  ``CLIENT_ID@`` :attr:`app_domain`, which Dovecot's second oauth2 passdb compares by domain
  (``username_format = %Ld``). An app token thus opens every mailbox of its tenant's domain and
  none elsewhere: the tenant-wide grant of an admin consent, without Exchange's per-mailbox
  permissions (``Add-MailboxPermission``), which Dovecot 2.3 cannot ask about.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

from authlib.oauth2.rfc7636 import create_s256_code_challenge
from joserfc import jwt
from joserfc.jwk import OctKey, RSAKey

__all__ = ["FakeProvider"]

DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"


@dataclass
class _Grant:
    user: str
    refresh_token: str
    revoked: bool = False


@dataclass
class _Fault:
    kind: str  # invalid_grant, 429, 500, slow, hold
    seconds: float = 0.0


@dataclass
class FakeProvider:
    """``with FakeProvider() as idp:``; ``idp.url`` is its base URL."""

    client_id: str = "mailferry-test"
    client_secret: str | None = None
    access_lifetime: float = 3.0
    rotate: bool = False
    consenting_user: str = "alice@example.test"
    service_account_public_key: Any = None  # a PEM for the JWT bearer grant
    id_tokens: bool = True  # False: the client must ask the user-info endpoint for the email
    app_domain: str = "example.test"  # the tenant: what app-only tokens may open
    requests: Counter[str] = field(default_factory=Counter)
    refreshes: Counter[str] = field(default_factory=Counter)  # refresh_token grants by token

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._grants: dict[str, _Grant] = {}  # refresh token -> grant
        self._access: dict[str, tuple[str, float]] = {}  # access token -> (user, expiry)
        self._app_tokens: set[str] = set()  # the access tokens of client credentials grants
        self._codes: dict[str, tuple[str, str, str]] = {}  # code -> (user, challenge, redirect)
        self._devices: dict[str, str] = {}  # device code -> user
        self._faults: list[_Fault] = []
        self._holding = threading.Event()  # a "hold" fault has a request waiting
        self._released = threading.Event()
        self.authorize_requests: list[dict[str, str]] = []
        self.device_scopes = ""
        self.scopes: dict[str, str] = {}  # the scope last asked for, by grant type
        self.issued: list[str] = []  # every token and secret handed out, to grep logs for
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # --- life cycle ---------------------------------------------------------------------------

    def start(self) -> FakeProvider:
        provider = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                provider._handle(self, "GET")

            def do_POST(self) -> None:
                provider._handle(self, "POST")

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FakeProvider:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    @property
    def url(self) -> str:
        assert self._server is not None, "not started"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    # --- what tests do ------------------------------------------------------------------------

    def grant(self, user: str) -> str:
        """A refresh token for ``user``, as if they had consented: what a test hands to
        ``mailbox add --refresh-token-stdin``."""
        token = self._new("rt")
        with self._lock:
            self._grants[token] = _Grant(user, token)
        return token

    def revoke(self, user: str) -> None:
        """Revoke every grant and access token of ``user`` (the user removed the app)."""
        with self._lock:
            for grant in self._grants.values():
                if grant.user == user:
                    grant.revoked = True
            self._access = {t: v for t, v in self._access.items() if v[0] != user}

    def expire_access_tokens(self) -> None:
        """Every access token issued so far stops working now."""
        with self._lock:
            self._access.clear()

    def fail_next(self, kind: str, times: int = 1, seconds: float = 0.0) -> None:
        """The next ``times`` token requests fail: ``invalid_grant``, ``429`` (Retry-After:
        ``seconds``), ``500``, ``slow`` (answered after ``seconds``), or ``hold`` (answered
        when :meth:`release` is called, or after ``seconds``, 30 when 0)."""
        with self._lock:
            if kind == "hold":
                self._holding.clear()
                self._released.clear()
            self._faults.extend(_Fault(kind, seconds) for _ in range(times))

    def holding(self) -> bool:
        """Whether a request held by a ``hold`` fault is waiting now (or was)."""
        return self._holding.is_set()

    def release(self) -> None:
        """Let the held requests go on (they are then answered as usual)."""
        self._released.set()

    def active_tokens(self, user: str) -> int:
        now = time.time()
        with self._lock:
            return sum(1 for u, exp in self._access.values() if u == user and exp > now)

    # --- HTTP ---------------------------------------------------------------------------------

    def _new(self, prefix: str) -> str:
        token = f"{prefix}-{secrets.token_urlsafe(24)}"
        self.issued.append(token)
        return token

    def _handle(self, request: BaseHTTPRequestHandler, method: str) -> None:
        parts = urlsplit(request.path)
        form = {k: v[0] for k, v in parse_qs(parts.query).items()}
        if method == "POST":
            length = int(request.headers.get("Content-Length") or 0)
            body = request.rfile.read(length).decode()
            form.update({k: v[0] for k, v in parse_qs(body).items()})
        routes = {"/authorize": self._authorize, "/token": self._token, "/device": self._device,
                  "/introspect": self._introspect, "/introspect/app": self._introspect_app,
                  "/userinfo": self._userinfo}
        route = routes.get(parts.path)
        if route is None:
            self._send(request, 404, {"error": "not_found"})
            return
        route(request, form)

    @staticmethod
    def _send(request: BaseHTTPRequestHandler, status: int, body: dict[str, Any],
              headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        request.send_response(status)
        request.send_header("Content-Type", "application/json")
        request.send_header("Content-Length", str(len(data)))
        request.send_header("Cache-Control", "no-store")
        for name, value in (headers or {}).items():
            request.send_header(name, value)
        request.end_headers()
        request.wfile.write(data)

    def _authorize(self, request: BaseHTTPRequestHandler, form: dict[str, str]) -> None:
        if form.get("client_id") != self.client_id or form.get("response_type") != "code":
            self._send(request, 400, {"error": "invalid_request"})
            return
        code = self._new("code")
        redirect = form.get("redirect_uri", "")
        self.authorize_requests.append(form)
        with self._lock:
            self._codes[code] = (self.consenting_user, form.get("code_challenge", ""), redirect)
        query = urlencode({"code": code, "state": form.get("state", "")})
        request.send_response(302)
        request.send_header("Location", f"{redirect}?{query}")
        request.send_header("Content-Length", "0")
        request.end_headers()

    def _device(self, request: BaseHTTPRequestHandler, form: dict[str, str]) -> None:
        code = self._new("dc")
        with self._lock:
            self._devices[code] = self.consenting_user
        self.device_scopes = form.get("scope", "")
        self._send(request, 200, {"device_code": code, "user_code": "WDJB-MJHT",
                                  "verification_uri": f"{self.url}/activate",
                                  "expires_in": 600, "interval": 1})

    def _client_ok(self, request: BaseHTTPRequestHandler, form: dict[str, str]) -> bool:
        if form.get("client_id", self.client_id) != self.client_id:
            return False
        return self.client_secret is None or form.get("client_secret") == self.client_secret

    def _token(self, request: BaseHTTPRequestHandler, form: dict[str, str]) -> None:
        grant_type = form.get("grant_type", "")
        with self._lock:
            self.requests[grant_type] += 1
            if grant_type == "refresh_token":
                self.refreshes[form.get("refresh_token", "")] += 1
            self.scopes[grant_type] = form.get("scope", "")
            fault = self._faults.pop(0) if self._faults else None
        if fault is not None:
            if fault.kind == "slow":
                time.sleep(fault.seconds)
            elif fault.kind == "hold":
                self._holding.set()
                self._released.wait(fault.seconds or 30.0)
            elif fault.kind == "429":
                self._send(request, 429, {"error": "rate_limited"},
                           {"Retry-After": str(int(fault.seconds))})
                return
            elif fault.kind == "500":
                self._send(request, 500, {"error": "server_error"})
                return
            else:
                self._send(request, 400, {"error": "invalid_grant",
                                          "error_description": "Token has been revoked"})
                return
        if grant_type != JWT_BEARER and not self._client_ok(request, form):
            self._send(request, 401, {"error": "invalid_client"})
            return
        user = self._grant_user(grant_type, form)
        if user is None:
            self._send(request, 400, {"error": "invalid_grant",
                                      "error_description": "unknown, revoked or expired grant"})
            return
        access = self._new("at")
        with self._lock:
            self._access[access] = (user, time.time() + self.access_lifetime)
            if grant_type == "client_credentials":
                self._app_tokens.add(access)
        body: dict[str, Any] = {"access_token": access, "token_type": "Bearer",
                                "expires_in": self.access_lifetime}
        if grant_type in ("authorization_code", DEVICE_GRANT) or (
                grant_type == "refresh_token" and self.rotate):
            new = self.grant(user)
            body["refresh_token"] = new
            if grant_type == "refresh_token":
                with self._lock:
                    self._grants[form["refresh_token"]].revoked = True  # rotated out
        if grant_type in ("authorization_code", DEVICE_GRANT) and self.id_tokens:
            body["id_token"] = jwt.encode({"alg": "HS256"}, {
                "iss": self.url, "aud": self.client_id, "sub": user, "email": user,
                "iat": int(time.time()), "exp": int(time.time() + 300)},
                OctKey.import_key(b"fake-id-token-signing-key-32-bytes!"))
        self._send(request, 200, body)

    def _grant_user(self, grant_type: str, form: dict[str, str]) -> str | None:
        with self._lock:
            if grant_type == "refresh_token":
                grant = self._grants.get(form.get("refresh_token", ""))
                return grant.user if grant and not grant.revoked else None
            if grant_type == "authorization_code":
                found = self._codes.pop(form.get("code", ""), None)
                if found is None or found[2] != form.get("redirect_uri"):
                    return None
                user, challenge, _ = found
                verifier = form.get("code_verifier", "")
                if challenge and create_s256_code_challenge(verifier) != challenge:
                    return None
                return user
            if grant_type == DEVICE_GRANT:
                return self._devices.pop(form.get("device_code", ""), None)
            if grant_type == "client_credentials":
                return self.client_id  # app-only: the application itself
        if grant_type == JWT_BEARER and self.service_account_public_key is not None:
            key = RSAKey.import_key(self.service_account_public_key)
            try:
                claims = jwt.decode(form.get("assertion", ""), key).claims
                jwt.JWTClaimsRegistry(exp={"essential": True}).validate(claims)
            except Exception:
                return None
            return str(claims.get("sub")) if claims.get("aud") == f"{self.url}/token" else None
        return None

    def _introspect(self, request: BaseHTTPRequestHandler, form: dict[str, str]) -> None:
        """RFC 7662: ``active`` and the ``username`` the token acts for (an app-only token: the
        client id, see the module docstring)."""
        token = form.get("token", "")
        with self._lock:
            found = self._access.get(token)
        if found is None or found[1] <= time.time():
            self._send(request, 200, {"active": False})
            return
        self._send(request, 200, {"active": True, "username": found[0],
                                  "exp": int(found[1]), "client_id": self.client_id})

    def _introspect_app(self, request: BaseHTTPRequestHandler, form: dict[str, str]) -> None:
        """App-only tokens only: ``username`` is ``CLIENT_ID@APP_DOMAIN``, for Dovecot to
        compare by domain with the mailbox logging in."""
        token = form.get("token", "")
        with self._lock:
            found = self._access.get(token) if token in self._app_tokens else None
        if found is None or found[1] <= time.time():
            self._send(request, 200, {"active": False})
            return
        self._send(request, 200, {"active": True, "username": f"{found[0]}@{self.app_domain}",
                                  "exp": int(found[1]), "client_id": self.client_id})

    def _userinfo(self, request: BaseHTTPRequestHandler, form: dict[str, str]) -> None:
        bearer = (request.headers.get("Authorization") or "").removeprefix("Bearer ").strip()
        with self._lock:
            found = self._access.get(bearer)
        if found is None or found[1] <= time.time():
            self._send(request, 401, {"error": "invalid_token"})
            return
        self._send(request, 200, {"email": found[0], "sub": found[0]})
