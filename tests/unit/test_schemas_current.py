"""docs/schemas/ is what applications in other languages read: it must say what the pydantic
models of shared/messages.py say today."""
from __future__ import annotations

from pathlib import Path

from mailferry import schemas

DOCS = Path(__file__).resolve().parents[2] / "docs" / "schemas"


def test_the_exported_json_schemas_are_current() -> None:
    expected = {name: schemas.render(schema) for name, schema in schemas.schemas().items()}
    on_disk = {str(p.relative_to(DOCS)): p.read_text(encoding="utf-8")
               for p in DOCS.rglob("*.json")}
    stale = sorted(n for n in expected.keys() | on_disk.keys()
                   if expected.get(n) != on_disk.get(n))
    assert not stale, (f"docs/schemas is stale ({', '.join(stale)}): run "
                       "`.venv/bin/python -m mailferry.schemas docs/schemas`")


def test_every_public_message_and_change_event_has_a_schema_saying_where_it_travels() -> None:
    exported = schemas.schemas()
    assert {"commands/SyncMailbox.json", "events/MessagesFetched.json",
            "changes/MessageStored.json", "changes/CredentialsInvalid.json"} <= exported.keys()
    stored = exported["changes/MessageStored.json"]
    assert stored["x-mailferry-amqp"]["routing_key"] == "mailbox.<mailbox_id>.message_stored"
    assert "from" in stored["properties"] and "raw" not in stored["properties"]
    assert exported["commands/SyncMailbox.json"]["required"] == ["run_id", "mailbox_id"]
