"""Getting a mailbox's refresh token without anyone handling it: ``mailferry oauth authorize``
(authorization code with PKCE and a loopback redirect, or the device grant) driven against the
devkit's fake provider, which consents at once."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator

import pytest
import requests
from pydantic import SecretStr

from mailferry import db
from mailferry.app import oauth as app_oauth
from mailferry.crypto import PasswordBox
from mailferry.devkit.oauth_provider import FakeProvider

USER = "bob@example.test"
OWNER = "owner@example.com"


@pytest.fixture
def idp() -> Iterator[FakeProvider]:
    with FakeProvider(consenting_user=USER, client_secret="client-secret") as provider:
        yield provider


@pytest.fixture
def box(secret_key: str) -> PasswordBox:
    return PasswordBox(SecretStr(secret_key))


@pytest.fixture
def provider(conn: db.Connection, box: PasswordBox, idp: FakeProvider) -> str:
    app_oauth.add_provider(conn, box, name="fake", kind="generic", client_id=idp.client_id,
                           client_secret="client-secret", token_url=f"{idp.url}/token",
                           authorize_url=f"{idp.url}/authorize", device_url=f"{idp.url}/device",
                           userinfo_url=f"{idp.url}/userinfo", scopes=["imap", "offline"])
    conn.execute("INSERT INTO users (email) VALUES (%s)", (OWNER,))
    return "fake"


def _authorize(env: dict[str, str], *extra: str) -> tuple[dict[str, object], str]:
    """Run the command; follow the URL it prints, as a browser would."""
    process = subprocess.Popen(
        [sys.executable, "-m", "mailferry.services.cli.main", "oauth", "authorize", "--provider",
         "fake", "--owner", OWNER, "--host", "127.0.0.1", "--port", "143", "--security", "none",
         "--no-browser", "--timeout", "60", *extra],
        env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stderr is not None
    shown = ""
    try:
        for line in iter(process.stderr.readline, b""):
            shown += line.decode()
            if match := re.search(r"(http://127\.0\.0\.1:\d+/authorize\?\S+)", shown):
                page = requests.get(match.group(1), timeout=30)
                assert "authorization received" in page.text
                break
            if "enter the code" in shown:
                break
        out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, shown + err.decode()
    return json.loads(out), shown + err.decode()


def test_authorize_runs_pkce_with_a_loopback_redirect_and_creates_then_renews_the_mailbox(
        env: dict[str, str], idp: FakeProvider, provider: str, conn: db.Connection,
        box: PasswordBox) -> None:
    created, shown = _authorize(env)
    asked = idp.authorize_requests[0]
    assert asked["code_challenge_method"] == "S256" and len(asked["code_challenge"]) == 43
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+/", asked["redirect_uri"])
    row = conn.execute(
        """SELECT m.username, m.auth_kind, t.refresh_token_encrypted FROM mailboxes m
             JOIN oauth_tokens t ON t.mailbox_id = m.id WHERE m.id = %s""",
        (created["id"],)).fetchone()
    assert row["username"] == USER and row["auth_kind"] == "oauth2"  # from the ID token
    first = box.decrypt(bytes(row["refresh_token_encrypted"]))
    assert first in idp.issued and first not in shown

    renewed, _ = _authorize(env)
    assert renewed["id"] == created["id"] and renewed["run_id"] is not None
    row = conn.execute("SELECT refresh_token_encrypted FROM oauth_tokens").fetchone()
    assert box.decrypt(bytes(row["refresh_token_encrypted"])) != first


def test_device_authorization_learns_the_address_from_user_info(
        env: dict[str, str], idp: FakeProvider, provider: str, conn: db.Connection) -> None:
    idp.id_tokens = False
    created, shown = _authorize(env, "--device")
    assert "enter the code WDJB-MJHT" in shown
    assert idp.device_scopes == "imap offline"
    row = conn.execute("SELECT username FROM mailboxes WHERE id = %s",
                       (created["id"],)).fetchone()
    assert row == {"username": USER}
