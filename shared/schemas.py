"""JSON Schema of every public message, exported from the pydantic models of ``shared/messages.py``.

``docs/schemas/`` holds them for applications written in any language (a test checks they are
current); regenerate after changing a message::

    python -m mailferry.schemas docs/schemas

- ``commands/``: what another application may publish (``SyncMailbox``, ``SyncFolders``), in
  validation mode: the fields mailferry requires, defaults for the others;
- ``events/``: the pipeline's events between fetchers, persisters and the notifier;
- ``changes/``: the change stream (``mailferry.changes``), what integrators consume.

Events and changes are in serialization mode: every field is always present. Each schema says
where its messages travel under ``x-mailferry-amqp`` (exchange, routing key, the AMQP ``type``
property, content type, the ``schema-version`` header).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Literal

from mailferry import messages, topology

COMMANDS: tuple[type[messages._Message], ...] = (messages.SyncMailbox, messages.SyncFolders)
EVENTS: tuple[type[messages._Message], ...] = (
    messages.SyncStarted, messages.FoldersListed, messages.MessagesFetched,
    messages.FlagsChanged, messages.MessagesExpunged, messages.FolderSynced,
    messages.SyncFinished, messages.SyncCompleted, messages.SyncFailed,
    messages.CredentialsInvalid, messages.CredentialsRestored)


def schemas() -> dict[str, dict[str, Any]]:
    """Relative file name -> schema."""
    out: dict[str, dict[str, Any]] = {}
    for kind, models, mode in (("commands", COMMANDS, "validation"),
                               ("events", EVENTS, "serialization"),
                               ("changes", messages.CHANGE_TYPES, "serialization")):
        for model in models:
            name = model.model_fields["type"].default
            out[f"{kind}/{name}.json"] = _schema(model, kind, name, mode)  # type: ignore[arg-type]
    return out


def _schema(model: type[messages._Message], kind: str, name: str,
            mode: Literal["validation", "serialization"]) -> dict[str, Any]:
    schema = {"$schema": "https://json-schema.org/draft/2020-12/schema",
              **model.model_json_schema(mode=mode)}
    version = model.model_fields["version"].default
    if kind == "changes":
        amqp = {"exchange": topology.CHANGES.name, "routing_key": "mailbox.<mailbox_id>."
                + messages.change_routing_key(0, name).split(".", 2)[2]}
    else:
        amqp = {"exchange": (topology.COMMANDS if kind == "commands" else topology.EVENTS).name,
                "routing_key": model.routing_key}
    schema["x-mailferry-amqp"] = {
        **amqp, "type": name, "delivery_mode": 2, "headers": {"schema-version": version},
        "content_type": messages.BLOBS_CONTENT_TYPE if model is messages.MessagesFetched
        else messages.JSON_CONTENT_TYPE}
    if model is messages.MessagesFetched:
        _blobs_head(schema)
    return schema


def _blobs_head(schema: dict[str, Any]) -> None:
    """MessagesFetched version 2 travels as its JSON part, a newline, then the raw bytes: the
    JSON part carries each message's ``raw_length`` instead of ``raw``, and ``blob_bytes``."""
    schema["description"] = (
        "Messages read from one folder. The body is this JSON (one line), a newline, then "
        "the raw messages' bytes concatenated in order; each message's raw_length says how "
        "many are its own (null: not carried), blob_bytes how many follow in all.")
    message = schema["$defs"]["FetchedMessage"]
    message["properties"].pop("raw")
    message["properties"]["raw_length"] = {"anyOf": [{"type": "integer", "minimum": 0},
                                                     {"type": "null"}], "title": "Raw Length"}
    message["required"] = [f if f != "raw" else "raw_length" for f in message["required"]]
    schema["properties"]["blob_bytes"] = {"type": "integer", "minimum": 0, "title": "Blob Bytes"}
    schema["required"].append("blob_bytes")


def render(schema: dict[str, Any]) -> str:
    return json.dumps(schema, indent=2, ensure_ascii=False, sort_keys=True) + "\n"


def export(directory: Path) -> list[Path]:
    """Write every schema under ``directory``; returns the files written."""
    written = []
    for name, schema in sorted(schemas().items()):
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(render(schema), encoding="utf-8")
        written.append(path)
    return written


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m mailferry.schemas DIRECTORY")
    for path in export(Path(sys.argv[1])):
        print(path)
