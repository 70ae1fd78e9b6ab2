"""A private RabbitMQ node for tests that need a broker setting no vhost can have.

RabbitMQ 3.10 (this machine's, Debian's) reads ``consumer_timeout`` from its configuration only:
the per-queue argument ``x-consumer-timeout`` and the policy key ``consumer-timeout`` came with
3.12. Changing the shared broker's setting (``application:set_env``) would cut other people's
tests, so a test that needs a short delivery timeout gets a node of its own: the same binaries,
its own node name, ports, data and log directories under the test's ``tmp_path``, stopped
and wiped with it. Start-up takes a few seconds.

The dashboard's renderer (scripts/render_dashboard.py) takes one too, for the
``rabbitmq_prometheus`` plugin that the shared broker does not run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from kombu.connection import Connection

from mailferry.devkit.services import free_port

SERVER = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")  # not the root wrapper, which su's


@contextmanager
def private_node(directory: Path, *, consumer_timeout_ms: int | None = None,
                 prometheus_port: int | None = None,
                 start_timeout: float = 120.0) -> Iterator[str]:
    """A single RabbitMQ node, with ``consumer_timeout`` set if given and the
    ``rabbitmq_prometheus`` plugin on ``prometheus_port`` (127.0.0.1) if given; yields its AMQP
    URL (``guest``, default vhost). Its log is ``directory / "log"``."""
    directory.mkdir(parents=True, exist_ok=True)
    port = free_port()
    dist_port = free_port()
    config = [f"listeners.tcp.1 = 127.0.0.1:{port}", "log.console = false"]
    plugins = []
    if consumer_timeout_ms is not None:
        config.append(f"consumer_timeout = {consumer_timeout_ms}")
    if prometheus_port is not None:
        config += [f"prometheus.tcp.port = {prometheus_port}", "prometheus.tcp.ip = 127.0.0.1"]
        plugins.append("rabbitmq_prometheus")
    (directory / "rabbitmq.conf").write_text("\n".join(config) + "\n")
    (directory / "enabled_plugins").write_text(f"[{','.join(plugins)}].\n")
    # A channel checks its deliveries' age on its tick (60 s by default): tick every second,
    # so a short consumer_timeout is enforced within a second of passing.
    (directory / "advanced.config").write_text("[{rabbit, [{channel_tick_interval, 1000}]}].\n")
    env = {
        **os.environ,
        "HOME": str(directory),  # its own Erlang cookie
        "RABBITMQ_NODENAME": f"mailferry-test-{port}@localhost",
        "RABBITMQ_NODE_PORT": str(port),
        "RABBITMQ_DIST_PORT": str(dist_port),
        "RABBITMQ_CONFIG_FILE": str(directory / "rabbitmq"),
        "RABBITMQ_ADVANCED_CONFIG_FILE": str(directory / "advanced.config"),
        "RABBITMQ_MNESIA_BASE": str(directory / "mnesia"),
        "RABBITMQ_LOG_BASE": str(directory / "log"),
        "RABBITMQ_ENABLED_PLUGINS_FILE": str(directory / "enabled_plugins"),
    }
    log = open(directory / "server.out", "wb")  # noqa: SIM115
    process = subprocess.Popen([str(SERVER)], env=env, stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)
    url = f"amqp://guest:guest@127.0.0.1:{port}//"
    try:
        deadline = time.monotonic() + start_timeout
        while True:
            if process.poll() is not None:
                output = (directory / "server.out").read_text(errors="replace")
                raise RuntimeError(f"RabbitMQ node exited: {output[-2000:]}")
            try:
                with Connection(url, connect_timeout=2) as conn:
                    conn.connect()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        yield url
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        log.close()
