"""Real-time notifications: with the topic permissions the README documents, each person can
read their own routing key on ``mailferry.notifications`` and nobody else's, over AMQP and STOMP
(the protocol Web-STOMP carries over WebSocket)."""

from __future__ import annotations

import json
import socket
import uuid
from collections.abc import Iterator
from urllib.parse import quote

import pytest
import websocket
from amqp.exceptions import AccessRefused

from services.notifier.channels import RealtimePublisher
from shared import topology
from shared.broker import Publisher, connect
from shared.config import Settings
from tests.support import services

STOMP_PORT = 61613
WEB_STOMP_PORT = 15674


def grant_own_notifications(vhost: str, rabbit_user: str, user_id: int) -> None:
    """The permissions of the README's "Real-time notifications" section, for one person."""
    v = quote(vhost, safe="")
    own_queues = r"^(stomp-subscription-|amq\.gen-).*"
    services.rabbit_api("PUT", f"/permissions/{v}/{quote(rabbit_user, safe='')}", {
        "configure": own_queues,
        "write": own_queues,
        "read": r"^(mailferry\.notifications|stomp-subscription-.*|amq\.gen-.*)$",
    })
    services.rabbit_api("PUT", f"/topic-permissions/{v}/{quote(rabbit_user, safe='')}", {
        "exchange": "mailferry.notifications",
        "write": "^$",
        "read": rf"^user\.{user_id}$",
    })


@pytest.fixture
def person(vhost: tuple[str, str]) -> Iterator[tuple[str, str]]:
    """A RabbitMQ user for app user 42: (name, password)."""
    name, password = f"mf-test-person-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    services.rabbit_api("PUT", f"/users/{name}", {"password": password, "tags": ""})
    with connect(vhost[1]) as admin:  # the exchange exists once any service has started
        topology.NOTIFICATIONS(admin.default_channel).declare()
    grant_own_notifications(vhost[0], name, 42)
    yield name, password
    services.rabbit_api("DELETE", f"/users/{name}")


def _bind(vhost: str, person: tuple[str, str], routing_key: str) -> None:
    url = f"amqp://{person[0]}:{person[1]}@127.0.0.1:5672/{quote(vhost, safe='')}"
    with connect(url) as conn:
        channel = conn.channel()
        queue = channel.queue_declare(queue="", exclusive=True).queue
        channel.queue_bind(queue, topology.NOTIFICATIONS.name, routing_key)


def test_a_person_may_bind_to_their_own_key(vhost: tuple[str, str], person: tuple[str, str]
                                            ) -> None:
    _bind(vhost[0], person, "user.42")


def test_a_person_may_not_bind_to_someone_elses_key(vhost: tuple[str, str],
                                                    person: tuple[str, str]) -> None:
    with pytest.raises(AccessRefused):
        _bind(vhost[0], person, "user.43")
    with pytest.raises(AccessRefused):
        _bind(vhost[0], person, "user.#")


def _stomp(frame: str) -> bytes:
    return frame.encode() + b"\0"


def _stomp_subscribe(vhost: str, person: tuple[str, str], destination: str) -> bytes:
    """CONNECT, SUBSCRIBE with a receipt, and return what the broker answered."""
    with socket.create_connection(("127.0.0.1", STOMP_PORT), timeout=10) as sock:
        sock.sendall(_stomp(f"CONNECT\naccept-version:1.2\nhost:{vhost}\nlogin:{person[0]}\n"
                            f"passcode:{person[1]}\n\n"))
        sock.sendall(_stomp(f"SUBSCRIBE\nid:0\ndestination:{destination}\nreceipt:r1\n\n"))
        answer = b""
        while b"RECEIPT" not in answer and b"ERROR" not in answer:
            chunk = sock.recv(4096)
            if not chunk:
                break
            answer += chunk
        return answer


def test_over_stomp_a_person_receives_their_own_key_and_is_refused_anothers(
    vhost: tuple[str, str], person: tuple[str, str]
) -> None:
    own = _stomp_subscribe(vhost[0], person, "/exchange/mailferry.notifications/user.42")
    assert b"RECEIPT" in own and b"ERROR" not in own
    other = _stomp_subscribe(vhost[0], person, "/exchange/mailferry.notifications/user.43")
    assert b"ERROR" in other and b"access_refused" in other.lower().replace(b" ", b"_")


def test_over_web_stomp_a_person_receives_the_notifications_published_for_them(
    vhost: tuple[str, str], person: tuple[str, str], settings: Settings
) -> None:
    """What a browser does: STOMP over WebSocket (Web-STOMP, port 15674), subscribed to its own
    key; the notifier's real-time channel publishes one notification for user 42 and one for
    user 43, and only the first arrives."""
    ws = websocket.create_connection(f"ws://127.0.0.1:{WEB_STOMP_PORT}/ws", timeout=10)
    try:
        ws.send(f"CONNECT\naccept-version:1.2\nhost:{vhost[0]}\nlogin:{person[0]}\n"
                f"passcode:{person[1]}\n\n\0")
        assert ws.recv().startswith("CONNECTED")
        ws.send("SUBSCRIBE\nid:0\ndestination:/exchange/mailferry.notifications/user.42\n"
                "receipt:r1\n\n\0")
        assert ws.recv().startswith("RECEIPT")
        publisher = Publisher(settings.broker_url, settings.retry_delays)
        realtime = RealtimePublisher(publisher)
        realtime.send(43, {"kind": "credentials_invalid", "title": "not for 42"})
        realtime.send(42, {"kind": "credentials_invalid", "title": "for 42"})
        publisher.close()
        frame = ws.recv()
    finally:
        ws.close()
    assert frame.startswith("MESSAGE")
    body = frame.split("\n\n", 1)[1].split("\0", 1)[0]
    assert json.loads(body) == {"kind": "credentials_invalid", "title": "for 42"}
