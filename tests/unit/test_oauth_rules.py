"""OAuth2 rules without I/O: endpoints, the refresh threshold, the SASL messages, what a
server's words mean, and how long a provider's Retry-After makes a retry wait."""

from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta

import pytest
import requests

from mailferry import oauth
from mailferry.broker import retry_delay
from mailferry.errors import ImapConnectionError, InvalidInput
from mailferry.imap import ImapConfig
from mailferry.imap.connection import _oauthbearer, _xoauth2

NOW = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)


def test_a_token_is_refreshed_when_less_than_a_fifth_of_its_life_is_left() -> None:
    issued = NOW - timedelta(seconds=2800)
    assert oauth.fresh_enough(issued + timedelta(seconds=3600), issued, NOW)  # 800 s of 3600 left
    assert not oauth.fresh_enough(issued + timedelta(seconds=3400), issued, NOW)  # 600 s left
    assert not oauth.fresh_enough(None, None, NOW)
    assert not oauth.fresh_enough(NOW, NOW - timedelta(seconds=60), NOW)


@pytest.mark.parametrize("url", ["http://login.example.com/token", "http://192.168.1.2/t",
                                 "file:///etc/passwd", "https:///no-host", "https://a b/x"])
def test_endpoints_off_loopback_must_be_https(url: str) -> None:
    with pytest.raises(InvalidInput):
        oauth.check_endpoint(url, "--token-url")


def test_xoauth2_and_oauthbearer_messages_follow_their_specifications() -> None:
    config = ImapConfig("imap.example.com", 993, "ssl", "a,b=c@example.com", "")
    assert _xoauth2("ann@example.com", "T0K") == b"user=ann@example.com\x01auth=Bearer T0K\x01\x01"
    # RFC 7628 3.1 and RFC 5801 4: "," and "=" in the authzid are escaped as =2C and =3D.
    assert _oauthbearer(config.username, "T0K", config) == (
        b"n,a=a=2Cb=3Dc@example.com,\x01host=imap.example.com\x01port=993\x01"
        b"auth=Bearer T0K\x01\x01")
    assert base64.b64encode(_xoauth2("u", "t"))  # what goes on the wire, base64 of the above


@pytest.mark.parametrize(("said", "expired"), [
    ("connection lost: command: FETCH => server said BYE: Session invalidated - "
     "AccessTokenExpired", True),
    ("NO [EXPIRED] token expired", True),
    ("connection lost: server said BYE: server shutting down", False),
    ("socket error: EOF", False),
])
def test_what_counts_as_an_expired_token_mid_sync(said: str, expired: bool) -> None:
    assert oauth.token_expired(ImapConnectionError(said)) is expired


def test_an_unavailable_provider_is_a_transient_connection_fault_not_refused_credentials() -> None:
    assert issubclass(oauth.TokenEndpointUnavailable, ImapConnectionError)
    assert oauth.GrantInvalid("x").kind == "auth"


@pytest.mark.parametrize(("header", "seconds"), [
    ("7", 7.0), (" 120 ", 120.0), ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0),  # a date long past
    ("soon", None), (None, None)])
def test_retry_after_is_read_in_seconds_or_as_an_http_date(header: str | None,
                                                         seconds: float | None) -> None:
    resp = requests.Response()
    if header is not None:
        resp.headers["Retry-After"] = header
    assert oauth.retry_after(resp) == seconds


@pytest.mark.parametrize(("retry_after", "attempt", "delay"), [
    (None, 0, 5.0),  # no wish: the configured back-off
    (3.0, 0, 5.0),  # shorter than the back-off: the back-off
    (20.0, 0, 30.0),  # the shortest delay at least that long
    (30.0, 1, 30.0),
    (5000.0, 0, 600.0),  # capped at the longest delay
])
def test_a_retry_waits_at_least_what_the_provider_asked_up_to_the_longest_delay(
        retry_after: float | None, attempt: int, delay: float) -> None:
    unavailable = oauth.TokenEndpointUnavailable("busy", retry_after=retry_after)
    assert retry_delay((5.0, 30.0, 120.0, 600.0), attempt, unavailable) == delay


def test_only_a_transient_failure_can_ask_for_a_longer_wait() -> None:
    class Odd(Exception):
        retry_after = 100.0

    assert retry_delay((1.0, 200.0), 0, Odd()) == 1.0
