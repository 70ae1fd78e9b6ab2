"""mailferry's IMAP boundary: the only code that talks to imapclient or imaplib.

Rooms: ``connection`` (address guard, TLS, STARTTLS, authentication, the connector), ``wire``
(the one module that touches imapclient's internals: bounded reads, literals, UID sets, raw
commands), ``folders`` (names, types, the tree), ``search`` (queries no value can break out of),
``manager`` (a library user's folder: select, search, fetch) and ``sync`` (what the fetcher asks,
in bounded windows).

The library API, in the shape of OroCRM ImapBundle's::

    from mailferry.imap import (ImapConfig, ImapEmailFolderManager, ImapEmailManager,
                             connector_factory)

    config = ImapConfig("imap.example.com", 993, "ssl", "user", "pwd")
    with connector_factory.create_imap_connector(config) as connector:
        manager = ImapEmailManager(connector)
        query = manager.get_search_query_builder().from_("test@test.com").subject("notice").get()
        manager.select_folder("INBOX")
        emails = manager.find_items(query)
        folders = ImapEmailFolderManager(connector).get_folders(None, recursive=True)

Every failure is a ``shared.errors.ImapError`` subclass with a one-line message naming the server
(``ImapAuthError`` for refused credentials, ``ImapTimeout`` past a deadline, ``ImapLimitExceeded``
for an answer larger than the limits); a bad argument (a NUL in a search value, a malformed UID
set) is a ``ValueError`` raised before anything is sent. Folder names are the names users see
(``"Données/Été"``); they are sent in modified UTF-7 (RFC 3501 section 5.1.3). A name that already
is valid modified UTF-7 (a ``raw_name``) is sent as it is, and a ``Folder`` or ``FolderInfo`` is
always selected by its ``raw_name``.
"""

from __future__ import annotations

from mailferry.imap.connection import (
    Authenticator,
    ImapConfig,
    ImapConnector,
    ImapConnectorFactory,
    OAuth2Auth,
    PasswordAuth,
    Security,
    TokenSource,
    connector_factory,
)
from mailferry.imap.folders import (
    Folder,
    ImapEmailFolderManager,
    decode_folder_name,
    encode_folder_name,
    folder_tree,
    folder_type,
)
from mailferry.imap.manager import Email, FolderStatus, ImapEmailManager
from mailferry.imap.search import SearchQuery, SearchQueryBuilder
from mailferry.imap.sync import SyncSession
from mailferry.imap.wire import Limits

__all__ = [
    "Authenticator",
    "Email",
    "Folder",
    "FolderStatus",
    "ImapConfig",
    "ImapConnector",
    "ImapConnectorFactory",
    "ImapEmailFolderManager",
    "ImapEmailManager",
    "Limits",
    "OAuth2Auth",
    "PasswordAuth",
    "SearchQuery",
    "SearchQueryBuilder",
    "Security",
    "SyncSession",
    "TokenSource",
    "connector_factory",
    "decode_folder_name",
    "encode_folder_name",
    "folder_tree",
    "folder_type",
]
