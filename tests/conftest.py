"""Fixtures over the real services: a private database and vhost per test, Dovecot per test."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from cryptography.fernet import Fernet

from mailferry import db
from mailferry.config import Settings
from mailferry.devkit import services

pytest_plugins = ["tests.bad_settings"]

# CLI commands and services as forks of a process that imported the CLI once (about a second of
# CPU less each; devkit/forkserver.py), unless MAILFERRY_DEVKIT_FORK=0 asks for new interpreters.
os.environ.setdefault("MAILFERRY_DEVKIT_FORK", "1")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The longest tests (marked ``early``) first: the test processes (``make test`` runs
    several) then finish at about the same time instead of waiting on one long test started
    last."""
    items.sort(key=lambda item: item.get_closest_marker("early") is None)


@pytest.fixture(scope="session")
def migrated_template() -> Iterator[str]:
    """A database migrated once; each test's database is a copy of it (fast)."""
    with services.private_database() as url:
        db.migrate(url)
        name = url.rpartition("/")[2]
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("SELECT 1")
        yield name


@pytest.fixture
def database_url(migrated_template: str) -> Iterator[str]:
    with services.private_database(template=migrated_template) as url:
        yield url


@pytest.fixture
def vhost() -> Iterator[tuple[str, str]]:
    with services.private_vhost() as pair:
        yield pair


@pytest.fixture
def secret_key() -> str:
    return Fernet.generate_key().decode()


@pytest.fixture
def env(database_url: str, vhost: tuple[str, str], secret_key: str) -> dict[str, str]:
    """The MAILFERRY_* environment of one isolated deployment."""
    return services.deployment_env(database_url, vhost[1], secret_key)


@pytest.fixture
def settings(env: dict[str, str]) -> Settings:
    return Settings(**{k.removeprefix("MAILFERRY_").lower(): v for k, v in env.items()})


@pytest.fixture
def conn(database_url: str) -> Iterator[db.Connection]:
    with db.connect(database_url, autocommit=True) as connection:
        yield connection


@pytest.fixture
def processes(env: dict[str, str], tmp_path: Path) -> Iterator[services.ServiceProcesses]:
    procs = services.ServiceProcesses(env, tmp_path)
    yield procs
    procs.stop()
