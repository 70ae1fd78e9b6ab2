"""``mailferry oauth ...``: OAuth2 identity providers, and getting a mailbox's tokens.

Registered on the main command group by ``services/cli/main.py``. Like the rest of the CLI it
only parses, calls ``mailferry.app.oauth`` and prints; secrets come from standard input or a
file, never from the command line, and are never printed.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from mailferry.app import oauth as app_oauth
from mailferry.crypto import PasswordBox
from mailferry.oauth import MAILBOX_PRESETS, PROVIDER_KINDS


class _Main:
    """The main CLI module's helpers (settings, connection, JSON and table output), looked up
    when a command runs: that module imports this one to register the group."""

    def __getattr__(self, name: str) -> Any:
        from mailferry.services.cli import main

        return getattr(main, name)


cli = _Main()
__all__ = ["MAILBOX_PRESETS", "oauth_group"]


@click.group("oauth")
def oauth_group() -> None:
    """OAuth2 identity providers (Google, Microsoft, any OAuth2 server) and authorization."""


@oauth_group.group("provider")
def provider_group() -> None:
    """The OAuth2 applications mailferry acts as."""


@provider_group.command("add")
@click.option("--name", required=True, help="a name to refer to it (mailbox add --oauth-provider)")
@click.option("--kind", required=True, type=click.Choice(PROVIDER_KINDS),
              help="google and microsoft fill the endpoints and scopes; generic needs --token-url")
@click.option("--client-id", required=True, help="the application's client id")
@click.option("--client-secret-stdin", is_flag=True,
              help="read the client secret from standard input (confidential clients, app-only)")
@click.option("--tenant", help="Microsoft Entra tenant id or domain (default: common)")
@click.option("--token-url", help="the token endpoint (https://; http:// on loopback only)")
@click.option("--authorize-url", help="the authorization endpoint")
@click.option("--device-url", help="the device authorization endpoint (RFC 8628)")
@click.option("--userinfo-url", help="the user-info endpoint (to learn a mailbox's address)")
@click.option("--scope", "scopes", multiple=True, help="a scope (repeatable; replaces the kind's)")
@click.option("--app-scope", "app_scopes", multiple=True,
              help="a scope of app-only access (repeatable; replaces the kind's)")
@click.option("--service-account-key-file", type=click.Path(exists=True, dir_okay=False,
                                                            path_type=Path),
              help="a Google service account's JSON key, stored encrypted (app-only access)")
def provider_add(name: str, kind: str, client_id: str, client_secret_stdin: bool,
                 tenant: str | None, token_url: str | None, authorize_url: str | None,
                 device_url: str | None, userinfo_url: str | None, scopes: tuple[str, ...],
                 app_scopes: tuple[str, ...], service_account_key_file: Path | None) -> None:
    """Register an OAuth2 provider; prints {"id": ...}."""
    secret = None
    if client_secret_stdin:
        secret = sys.stdin.readline().strip()
        if not secret:
            raise click.UsageError("no client secret on standard input")
    key = service_account_key_file.read_text() if service_account_key_file else None
    settings = cli._settings()
    provider_id = app_oauth.add_provider(
        cli._conn(settings), PasswordBox(settings.secret_key), name=name, kind=kind,
        client_id=client_id, client_secret=secret, tenant=tenant, token_url=token_url,
        authorize_url=authorize_url, device_url=device_url, userinfo_url=userinfo_url,
        scopes=scopes, app_scopes=app_scopes, service_account_key=key)
    cli._json({"id": provider_id})


@provider_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="print JSON with stable keys")
def provider_list(as_json: bool) -> None:
    """List providers (whether a secret is stored, never the secret)."""
    rows = app_oauth.list_providers(cli._conn(cli._settings()))
    if as_json:
        cli._json(rows)
    else:
        cli._table(rows, ["id", "name", "kind", "client_id", "token_url", "scopes",
                          "has_client_secret", "mailboxes"])


@oauth_group.command("authorize")
@click.option("--provider", required=True, help="the provider's name (oauth provider list)")
@click.option("--owner", help="email of the owning user")
@click.option("--system", is_flag=True, help="a system mailbox, owned by no one")
@click.option("--preset", type=click.Choice(sorted(MAILBOX_PRESETS)),
              help="the IMAP server (default: gmail for google, outlook for microsoft)")
@click.option("--host", help="the IMAP server's host name (instead of --preset)")
@click.option("--port", type=click.IntRange(1, 65535), help="the IMAP port")
@click.option("--security", type=click.Choice(["ssl", "starttls", "none"]), help="IMAP security")
@click.option("--no-browser", is_flag=True, help="only print the URL to open")
@click.option("--device", is_flag=True,
              help="device authorization (RFC 8628): a code to type on another device")
@click.option("--timeout", type=click.FloatRange(1, 3600), default=300.0, show_default=True,
              help="seconds to wait for the person")
def authorize(provider: str, owner: str | None, system: bool, preset: str | None,
              host: str | None, port: int | None, security: str | None, no_browser: bool,
              device: bool, timeout: float) -> None:
    """Authorize mailferry for a mailbox in a browser, then create it (or renew its token);
    prints {"id": ..., "run_id": ...}.

    Runs the authorization-code flow with PKCE and a loopback redirect to
    http://127.0.0.1:<port>/: open the printed URL, consent, and the browser comes back here.
    The mailbox's address is learned from the provider; no token is ever shown.
    """
    if bool(owner) == system:
        raise click.UsageError("give exactly one of --owner EMAIL or --system")

    def show(what: str) -> None:
        if device:
            click.echo(what, err=True)
            return
        click.echo(f"Open this URL to authorize mailferry:\n{what}", err=True)
        if not no_browser:
            import webbrowser

            webbrowser.open(what)

    settings = cli._settings()
    with cli.app.publisher(settings) as publisher:
        updated = app_oauth.authorize(
            cli._conn(settings), PasswordBox(settings.secret_key), publisher.publish,
            provider=provider, owner_email=owner or None, show=show, device=device,
            preset=preset, host=host, port=port, security=security, timeout=timeout)
    cli._json({"id": updated.id, "run_id": updated.run_id})
