"""mailferry: keeps many people's IMAP mailboxes synchronized into PostgreSQL, as an event-driven
pipeline on RabbitMQ. This is the library a host application embeds::

    import mailferry

    config = mailferry.ImapConfig("imap.example.com", 993, "ssl", "user", "pwd")
    with mailferry.connector_factory.create_imap_connector(config) as connector:
        folders = mailferry.ImapEmailFolderManager(connector).get_folders()

and the service layer the ``mailferry`` command calls (``add_mailbox``, ``request_sync``,
``status``...; see ``mailferry.app``). Names are loaded on first use, so importing one part (the
settings, the messages) does not load the others.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mailferry.app import (
        add_mailbox,
        add_user,
        check_mailbox,
        import_mailboxes,
        list_dead_letters,
        list_folders,
        list_mailboxes,
        list_notifications,
        pop_notifications,
        publisher,
        remove_mailbox,
        remove_user,
        replay_dead_letters,
        request_sync,
        set_folders,
        status,
        update_mailbox,
    )
    from mailferry.config import Settings, load_settings
    from mailferry.imap import (
        Email,
        Folder,
        FolderStatus,
        ImapConfig,
        ImapConnector,
        ImapConnectorFactory,
        ImapEmailFolderManager,
        ImapEmailManager,
        Limits,
        SearchQuery,
        SearchQueryBuilder,
        connector_factory,
    )

_WHERE = {
    **dict.fromkeys(
        ("Email", "Folder", "FolderStatus", "ImapConfig", "ImapConnector", "ImapConnectorFactory",
         "ImapEmailFolderManager", "ImapEmailManager", "Limits", "SearchQuery",
         "SearchQueryBuilder", "connector_factory"), "mailferry.imap"),
    **dict.fromkeys(
        ("add_mailbox", "add_user", "check_mailbox", "import_mailboxes", "list_dead_letters",
         "list_folders",
         "list_mailboxes", "list_notifications", "pop_notifications", "publisher",
         "remove_mailbox", "remove_user", "replay_dead_letters", "request_sync", "set_folders",
         "status", "update_mailbox"), "mailferry.app"),
    **dict.fromkeys(("Settings", "load_settings"), "mailferry.config"),
}

__all__ = sorted(_WHERE)  # the names are re-exported lazily (see __getattr__)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'mailferry' has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name]), name)
