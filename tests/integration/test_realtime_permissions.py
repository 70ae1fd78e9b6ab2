"""Real-time notifications: with the permissions the README documents (its commands are read from
the README and applied through the management API), RabbitMQ itself keeps each person to their own
notifications, whatever the protocol (AMQP, STOMP, Web-STOMP) and whatever the STOMP destination.

Person 42 plays the intruder against person 43, who listens like a browser (Web-STOMP). RabbitMQ
closes a STOMP connection after an ERROR, so each attempt gets its own connection.
"""

from __future__ import annotations

import json
import shlex
import uuid
from collections.abc import Iterator
from urllib.parse import quote

import pytest
from amqp.exceptions import AccessRefused

from mailferry import topology
from mailferry.broker import Publisher, connect
from mailferry.config import Settings
from mailferry.devkit import services
from mailferry.devkit.stomp import TRANSPORTS, Frame, StompClient
from mailferry.services.notifier.channels import RealtimePublisher

INTRUDER, VICTIM = 42, 43
EXCHANGE = f"/exchange/{topology.NOTIFICATIONS.name}"
People = dict[int, tuple[str, str]]  # app user id -> (RabbitMQ user, password)


def documented_commands() -> list[list[str]]:
    """The ``rabbitmqctl`` lines of the README's real-time block, for person 42."""
    text = (services.REPO / "README.md").read_text()
    block = text.split("rabbitmqctl add_user person-42", 1)[1].split("```", 1)[0]
    lines = block.replace("\\\n", " ").splitlines()
    return [shlex.split(line) for line in lines if line.strip().startswith("rabbitmqctl")]


def grant_as_documented(vhost: str, rabbit_user: str, user_id: int) -> None:
    """Apply the README's commands to ``rabbit_user`` in ``vhost``, for app user ``user_id``."""
    v, u = quote(vhost, safe=""), quote(rabbit_user, safe="")
    commands = documented_commands()
    assert [c[:2] for c in commands] == [["rabbitmqctl", "set_permissions"],
                                         ["rabbitmqctl", "set_topic_permissions"]]
    for command in commands:
        assert command[2:5] == ["-p", "/", "person-42"], command
        args = [arg.replace("42", str(user_id)) for arg in command[5:]]
        if command[1] == "set_permissions":
            configure, write, read = args
            services.rabbit_api("PUT", f"/permissions/{v}/{u}",
                                {"configure": configure, "write": write, "read": read})
        else:
            exchange, write, read = args
            services.rabbit_api("PUT", f"/topic-permissions/{v}/{u}",
                                {"exchange": exchange, "write": write, "read": read})


@pytest.fixture
def people(vhost: tuple[str, str]) -> Iterator[People]:
    with connect(vhost[1]) as admin:  # the exchange exists once any service has started
        topology.NOTIFICATIONS(admin.default_channel).declare()
    created: People = {}
    try:
        for user_id in (INTRUDER, VICTIM):
            name, password = f"mf-test-person-{user_id}-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
            services.rabbit_api("PUT", f"/users/{name}", {"password": password, "tags": ""})
            created[user_id] = name, password
            grant_as_documented(vhost[0], name, user_id)
        yield created
    finally:
        for name, _ in created.values():
            services.rabbit_api("DELETE", f"/users/{name}")


@pytest.fixture
def realtime(settings: Settings) -> Iterator[RealtimePublisher]:
    """Publishes exactly as the notifier's real-time channel does (confirmed, persistent)."""
    publisher = Publisher(settings.broker_url, settings.retry_delays)
    yield RealtimePublisher(publisher)
    publisher.close()


def own_queue(user_id: int, label: str = "tab") -> str:
    return f"user-{user_id}-{label}-{uuid.uuid4().hex[:8]}"


def refused(answer: Frame) -> bool:
    """ERROR ``access_refused`` over STOMP; over Web-STOMP, RabbitMQ 3.10 closes the WebSocket
    instead ("STOMP died", the refusal is in the broker's log). Either way there is no RECEIPT,
    and the same attempts over plain STOMP show the reason."""
    if answer.command == "CLOSED":
        return answer.headers.get("message") == "STOMP died"
    return answer.command == "ERROR" and answer.headers.get("message") == "access_refused"


def notification(user_id: int, n: int) -> dict[str, object]:
    return {"kind": "credentials_invalid", "title": f"for {user_id}, number {n}"}


def bodies(frames: list[Frame]) -> list[object]:
    return [json.loads(frame.body) for frame in frames]


def try_each(transport: str, vhost: str, person: tuple[str, str],
             attempts: list[tuple[str, dict[str, str]]]) -> list[tuple[str, dict[str, str], str]]:
    """Subscribe once per attempt, each on its own connection; the attempts not refused."""
    accepted = []
    for destination, headers in attempts:
        with StompClient(transport, vhost, *person) as client:
            answer = client.subscribe(destination, **headers)
        if not refused(answer):
            accepted.append((destination, headers, f"{answer.command} {answer.headers}"))
    return accepted


# AMQP ------------------------------------------------------------------------------------------

def _amqp_url(vhost: str, person: tuple[str, str]) -> str:
    return f"amqp://{person[0]}:{person[1]}@127.0.0.1:5672/{quote(vhost, safe='')}"


def _bind(vhost: str, person: tuple[str, str], queue: str, routing_key: str) -> None:
    with connect(_amqp_url(vhost, person)) as conn:
        channel = conn.channel()
        channel.queue_declare(queue=queue, exclusive=True)
        channel.queue_bind(queue, topology.NOTIFICATIONS.name, routing_key)


def test_over_amqp_a_person_may_bind_a_queue_of_their_own_to_their_own_key(
    vhost: tuple[str, str], people: People
) -> None:
    _bind(vhost[0], people[INTRUDER], own_queue(INTRUDER), "user.42")


@pytest.mark.parametrize("routing_key", ["user.43", "user.*", "*.43", "#", ""])
def test_over_amqp_a_person_may_not_bind_to_someone_elses_key_or_a_wildcard(
    vhost: tuple[str, str], people: People, routing_key: str
) -> None:
    with pytest.raises(AccessRefused):
        _bind(vhost[0], people[INTRUDER], own_queue(INTRUDER), routing_key)


def test_over_amqp_a_person_may_not_declare_a_queue_outside_their_prefix(
    vhost: tuple[str, str], people: People
) -> None:
    """Neither a server-named ``amq.gen-`` queue nor one under someone else's prefix."""
    for queue in ("", own_queue(VICTIM)):
        with pytest.raises(AccessRefused):
            _bind(vhost[0], people[INTRUDER], queue, "user.42")


def test_over_amqp_a_person_may_not_route_the_notifications_into_an_exchange_of_their_own(
    vhost: tuple[str, str], people: People
) -> None:
    """``^user-42-`` also names exchanges; an exchange-to-exchange binding is held to the same
    topic permission as a queue binding."""
    with connect(_amqp_url(vhost[0], people[INTRUDER])) as conn:
        channel = conn.channel()
        mine = own_queue(INTRUDER, "exchange")
        channel.exchange_declare(mine, "fanout", auto_delete=True)
        with pytest.raises(AccessRefused):
            channel.exchange_bind(mine, topology.NOTIFICATIONS.name, "#")


# STOMP and Web-STOMP ---------------------------------------------------------------------------

@pytest.mark.parametrize("transport", TRANSPORTS)
def test_every_destination_to_someone_elses_live_notifications_is_refused_and_they_get_all(
    vhost: tuple[str, str], people: People, realtime: RealtimePublisher, transport: str
) -> None:
    """Person 43 listens over Web-STOMP; person 42 tries every destination form against 43's
    queue and key and is refused each time, then listens on their own key and receives their own
    notification and nothing of 43's; 43 receives all of theirs (none taken round-robin)."""
    victim_queue = own_queue(VICTIM)
    with StompClient("web-stomp", vhost[0], *people[VICTIM]) as victim:
        answer = victim.subscribe(f"{EXCHANGE}/user.43", x_queue_name=victim_queue)
        assert answer.command == "RECEIPT", answer

        mine = {"x-queue-name": own_queue(INTRUDER)}
        durable = {"durable": "true", "auto-delete": "false"}
        attempts: list[tuple[str, dict[str, str]]] = [
            (f"/amq/queue/{victim_queue}", {}),
            (f"/queue/{victim_queue}", {}),
            (f"{EXCHANGE}/user.43", {}),
            (f"{EXCHANGE}/user.43", mine),
            (f"{EXCHANGE}/user.43", {"x-queue-name": victim_queue}),
            (f"{EXCHANGE}/user.42", {"x-queue-name": victim_queue}),
            (f"{EXCHANGE}/user.43", {**mine, **durable}),
            (f"{EXCHANGE}/user.43", {"x-queue-name": victim_queue, **durable}),
            (f"{EXCHANGE}/user.*", mine),
            (f"{EXCHANGE}/*.43", mine),
            (f"{EXCHANGE}/#", mine),
            (EXCHANGE, mine),
            ("/topic/user.43", mine),
            ("/topic/user.43", {"x-queue-name": victim_queue, **durable}),
            ("/topic/#", mine),
            ("/exchange/amq.topic/user.43", mine),
        ]
        assert try_each(transport, vhost[0], people[INTRUDER], attempts) == []

        with StompClient(transport, vhost[0], *people[INTRUDER]) as intruder:
            answer = intruder.subscribe(f"{EXCHANGE}/user.42", x_queue_name=own_queue(INTRUDER))
            assert answer.command == "RECEIPT", answer
            for n in range(3):
                realtime.send(VICTIM, notification(VICTIM, n))
            # Confirmed publishes are routed in order: anything of 43's that reached 42's queue
            # would come before 42's own notification.
            realtime.send(INTRUDER, notification(INTRUDER, 0))
            assert bodies(intruder.messages(1, timeout=10)) == [notification(INTRUDER, 0)]
        assert bodies(victim.messages(3, timeout=10)) == [notification(VICTIM, n)
                                                          for n in range(3)]


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_what_waits_in_a_durable_subscription_is_delivered_to_its_owner_only(
    vhost: tuple[str, str], people: People, realtime: RealtimePublisher, transport: str
) -> None:
    """Person 43 subscribes durably and goes offline; three notifications wait in the queue;
    person 42 cannot reach them by any destination; 43 comes back and receives all three."""
    inbox = own_queue(VICTIM, "inbox")
    durable = {"x_queue_name": inbox, "durable": "true", "auto_delete": "false",
               "x_expires": "600000"}
    with StompClient("web-stomp", vhost[0], *people[VICTIM]) as victim:
        assert victim.subscribe(f"{EXCHANGE}/user.43", **durable).command == "RECEIPT"
        victim.disconnect()
    for n in range(3):
        realtime.send(VICTIM, notification(VICTIM, n))

    same_queue = {"x-queue-name": inbox, "durable": "true", "auto-delete": "false"}
    attempts: list[tuple[str, dict[str, str]]] = [
        (f"/amq/queue/{inbox}", {}),
        (f"/queue/{inbox}", {}),
        (f"/queue/{inbox}", {"durable": "false", "auto-delete": "true"}),
        (f"{EXCHANGE}/user.43", same_queue),
        (f"{EXCHANGE}/user.42", same_queue),
        ("/topic/user.43", same_queue),
    ]
    assert try_each(transport, vhost[0], people[INTRUDER], attempts) == []

    with connect(vhost[1]) as admin:  # exact, unlike the management API's sampled statistics
        waiting = admin.default_channel.queue_declare(inbox, passive=True)
    assert (waiting.message_count, waiting.consumer_count) == (3, 0)
    with StompClient("web-stomp", vhost[0], *people[VICTIM]) as victim:
        assert victim.subscribe(f"{EXCHANGE}/user.43", **durable).command == "RECEIPT"
        assert bodies(victim.messages(3, timeout=10)) == [notification(VICTIM, n)
                                                          for n in range(3)]


def test_a_subscription_without_a_queue_name_of_ones_own_is_refused(
    vhost: tuple[str, str], people: People
) -> None:
    """Without ``x-queue-name`` RabbitMQ names the queue ``stomp-subscription-<md5 of destination
    and subscription id>``: predictable and shared by anyone who may read it, so refused."""
    with StompClient("web-stomp", vhost[0], *people[VICTIM]) as victim:
        assert refused(victim.subscribe(f"{EXCHANGE}/user.43"))
