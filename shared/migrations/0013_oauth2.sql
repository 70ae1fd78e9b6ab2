-- OAuth2 credentials (issue 12): identity providers (client id, encrypted client secret or
-- service-account key, endpoints, scopes), a mailbox's kind of authentication, and one token row
-- per OAuth2 mailbox: the refresh token and the cached access token, both encrypted with
-- MAILFERRY_SECRET_KEY like passwords. The token row is the lock that serializes refreshes
-- (SELECT ... FOR UPDATE): refreshing one refresh token twice at once can invalidate it.
-- depends: 0011_due_index

CREATE TABLE oauth_providers (
    id                     bigserial PRIMARY KEY,
    name                   text NOT NULL,
    kind                   text NOT NULL CHECK (kind IN ('google', 'microsoft', 'generic')),
    client_id              text NOT NULL,
    client_secret_encrypted bytea,
    service_account_key_encrypted bytea,  -- Google JWT bearer (RFC 7523)
    tenant                 text,
    token_url              text NOT NULL,
    authorize_url          text,
    device_url             text,
    userinfo_url           text,
    scopes                 text[] NOT NULL DEFAULT '{}',
    app_scopes             text[] NOT NULL DEFAULT '{}',  -- client credentials / JWT bearer
    created_at             timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX oauth_providers_name_key ON oauth_providers (lower(name));

ALTER TABLE mailboxes ADD COLUMN auth_kind text NOT NULL DEFAULT 'password'
    CHECK (auth_kind IN ('password', 'oauth2', 'oauth2-app'));

CREATE TABLE oauth_tokens (
    mailbox_id               bigint PRIMARY KEY REFERENCES mailboxes (id) ON DELETE CASCADE,
    provider_id              bigint NOT NULL REFERENCES oauth_providers (id),
    refresh_token_encrypted  bytea,  -- NULL for app-only mailboxes
    access_token_encrypted   bytea,
    access_token_expires_at  timestamptz,
    access_token_issued_at   timestamptz,
    last_refreshed_at        timestamptz,
    last_refresh_error       text,
    updated_at               timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX oauth_tokens_provider_idx ON oauth_tokens (provider_id);
