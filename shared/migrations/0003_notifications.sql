-- Credential notifications: one alert state per mailbox (so people are told once per
-- transition, and reminded on a timer), and one delivery row per notification and channel (so a
-- channel that is down is retried on its own, without resending on the others).
-- depends: 0002_lz4_bodies

ALTER TABLE sync_runs ADD COLUMN attempts integer NOT NULL DEFAULT 0;

CREATE TABLE credential_alerts (
    mailbox_id   bigint PRIMARY KEY REFERENCES mailboxes (id) ON DELETE CASCADE,
    state        text NOT NULL CHECK (state IN ('invalid', 'ok')),
    error        text,
    changed_at   timestamptz NOT NULL,
    notified_at  timestamptz,
    reminders    integer NOT NULL DEFAULT 0
);

CREATE TABLE notification_deliveries (
    id               bigserial PRIMARY KEY,
    notification_id  bigint NOT NULL REFERENCES notifications (id) ON DELETE CASCADE,
    channel          text NOT NULL CHECK (channel IN ('email', 'realtime')),
    status           text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'sent')),
    attempts         integer NOT NULL DEFAULT 0,
    next_attempt_at  timestamptz NOT NULL DEFAULT now(),
    last_error       text,
    sent_at          timestamptz,
    UNIQUE (notification_id, channel)
);
CREATE INDEX notification_deliveries_pending_idx ON notification_deliveries (next_attempt_at)
    WHERE status = 'pending';
