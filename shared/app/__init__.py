"""mailferry's service layer: the product's rules as plain functions.

An entry point (the ``mailferry`` CLI, a host application embedding mailferry, a test) parses its
input, calls these with its adapters (a database connection, a publish callable, a
:class:`~shared.crypto.PasswordBox`, the settings) and shows the result; it holds no rule and no
SQL of its own. Bad input raises :class:`~shared.errors.InvalidInput`, an unknown id
:class:`~shared.errors.NotFound`: one clear line each, never a traceback.
"""

from __future__ import annotations

from mailferry.app.dead_letters import list_dead_letters, replay_dead_letters
from mailferry.app.mailboxes import (
    CheckResult,
    ImportRefused,
    LineError,
    MailboxChanges,
    MailboxLine,
    Updated,
    add_mailbox,
    add_user,
    check_mailbox,
    get_mailbox,
    import_mailboxes,
    list_folders,
    list_mailboxes,
    list_messages,
    list_users,
    raw_message,
    request_sync,
    rotate_keys,
    run_states,
    selection_notes,
    set_folders,
    status,
    update_mailbox,
)
from mailferry.app.publishing import Publish, publisher
from mailferry.app.removal import remove_mailbox, remove_user
from mailferry.notifications import list_notifications, pop_notifications

__all__ = [
    "CheckResult", "ImportRefused", "LineError", "MailboxChanges", "MailboxLine", "Publish",
    "Updated", "add_mailbox", "add_user", "check_mailbox", "get_mailbox", "import_mailboxes",
    "list_dead_letters", "list_folders", "list_mailboxes",
    "list_messages", "list_notifications", "list_users", "pop_notifications", "publisher",
    "raw_message", "remove_mailbox", "remove_user", "replay_dead_letters", "request_sync",
    "rotate_keys", "run_states", "selection_notes", "set_folders", "status", "update_mailbox",
]
