"""Secrets: never in a log line, encrypted at rest across key rotations, a bad key is a clear error."""
from __future__ import annotations

import pytest
from cryptography.fernet import Fernet
from pydantic import SecretStr

from mailferry.config import Settings
from mailferry.crypto import PasswordBox
from mailferry.errors import ConfigError
from mailferry.logging import mask_url, redact


def test_log_lines_never_carry_passwords_or_url_credentials() -> None:
    event = redact(None, "info", {"password": "hunter2", "broker_url": "amqp://u:hunter2@h//",
                                  "lease_token": 4, "event": "x"})
    assert event == {"password": "***", "broker_url": "amqp://u:***@h//", "lease_token": 4,
                     "event": "x"}
    assert mask_url("postgresql://postgres@127.0.0.1/db") == "postgresql://postgres@127.0.0.1/db"


def test_passwords_round_trip_and_survive_a_key_rotation() -> None:
    old, new = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    token = PasswordBox(SecretStr(old)).encrypt("pässword")
    rotating = PasswordBox(SecretStr(f"{new},{old}"))
    rotated = rotating.rotate(token)
    assert PasswordBox(SecretStr(new)).decrypt(rotated) == "pässword"
    with pytest.raises(ConfigError, match="cannot be decrypted"):
        PasswordBox(SecretStr(new)).decrypt(token)


def test_a_missing_or_malformed_secret_key_is_a_clear_configuration_error() -> None:
    with pytest.raises(ConfigError, match="MAILFERRY_SECRET_KEY is not set"):
        PasswordBox(None)
    with pytest.raises(ConfigError, match="Fernet keys"):
        PasswordBox(SecretStr("not-a-key"))


def test_settings_read_comma_separated_retry_delays(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAILFERRY_RETRY_DELAYS", "1, 2.5,10")
    assert Settings().retry_delays == (1.0, 2.5, 10.0)
