"""Passwords at rest: Fernet (AES-128-CBC + HMAC-SHA256) from the ``cryptography`` package.

MAILFERRY_SECRET_KEY holds one or more Fernet keys separated by commas. The first encrypts; all
decrypt, so a key can be rotated in by putting the new key first, re-encrypting the stored
passwords (:meth:`PasswordBox.rotate`), then dropping the old one.
"""

from __future__ import annotations

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from pydantic import SecretStr

from mailferry.errors import ConfigError


def generate_key() -> str:
    return Fernet.generate_key().decode()


class PasswordBox:
    def __init__(self, secret_key: SecretStr | None) -> None:
        if secret_key is None or not secret_key.get_secret_value().strip():
            raise ConfigError(
                "MAILFERRY_SECRET_KEY is not set; create one with `mailferry keys generate`"
            )
        try:
            keys = [Fernet(k.strip()) for k in secret_key.get_secret_value().split(",") if k.strip()]
        except ValueError as exc:
            raise ConfigError(
                "MAILFERRY_SECRET_KEY must be Fernet keys (32 url-safe base64 bytes), comma separated"
            ) from exc
        self._fernet = MultiFernet(keys)

    def encrypt(self, password: str) -> bytes:
        return self._fernet.encrypt(password.encode())

    def decrypt(self, token: bytes) -> str:
        try:
            return self._fernet.decrypt(bytes(token)).decode()
        except InvalidToken as exc:
            raise ConfigError(
                "a stored password cannot be decrypted with MAILFERRY_SECRET_KEY (wrong or removed key)"
            ) from exc

    def rotate(self, token: bytes) -> bytes:
        return self._fernet.rotate(bytes(token))
