-- Connection budgets (README "Provider limits"): every IMAP connection a fetcher or a watch
-- opens holds a slot here first, so the whole deployment stays within each account's limit
-- (and a host's, when MAILFERRY_MAX_CONNECTIONS_PER_HOST is set), whatever the number of
-- processes. A slot is a lease: its process renews it while the connection is open and deletes
-- it after logout; a crashed process's slots expire within a lease period. No foreign key to
-- mailboxes: the lock it would take on the mailbox row would make claims wait on persisters.
-- Written by shared/slots.py only.
-- depends: 0016_provider_limits

CREATE TABLE imap_connection_slots (
    id          bigserial PRIMARY KEY,
    host        text NOT NULL,          -- lower case, no trailing dot
    account     text NOT NULL,          -- the username on that host, lower case
    purpose     text NOT NULL CHECK (purpose IN ('sync', 'watch')),
    mailbox_id  bigint NOT NULL,
    holder      text NOT NULL,          -- the process: fetcher@host:pid, scheduler@host:pid
    claimed_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL
);
CREATE INDEX imap_connection_slots_account_idx ON imap_connection_slots (host, account);

-- One statement claims a slot, or returns NULL when the budget is full. Claims of one account
-- (and, with a host limit, of one host) are serialised by advisory locks held to the end of
-- the statement's transaction; each statement of a PL/pgSQL function takes a new snapshot, so
-- the counts see every slot committed by the claims that held the lock before. A watch passes
-- reserve = 1: it leaves the last slot of each budget to syncs, which it would starve.
CREATE FUNCTION mailferry_claim_connection(p_host text, p_account text, p_purpose text,
                                           p_mailbox bigint, p_holder text, p_seconds float8,
                                           p_account_limit integer, p_host_limit integer,
                                           p_reserve integer) RETURNS bigint
    LANGUAGE plpgsql AS $$
DECLARE
    slot bigint;
BEGIN
    -- Host before account, always: two claims never wait on each other in opposite orders.
    IF p_host_limit IS NOT NULL THEN
        PERFORM pg_advisory_xact_lock(1836083558, hashtext(p_host));
    END IF;
    PERFORM pg_advisory_xact_lock(1836083559, hashtext(p_host || ' ' || p_account));
    DELETE FROM imap_connection_slots
     WHERE host = p_host AND account = p_account AND expires_at < now();
    IF (SELECT count(*) FROM imap_connection_slots
         WHERE host = p_host AND account = p_account) >= p_account_limit - p_reserve THEN
        RETURN NULL;
    END IF;
    IF p_host_limit IS NOT NULL AND (SELECT count(*) FROM imap_connection_slots
                                      WHERE host = p_host AND expires_at >= now())
                                    >= p_host_limit - p_reserve THEN
        RETURN NULL;
    END IF;
    INSERT INTO imap_connection_slots (host, account, purpose, mailbox_id, holder, expires_at)
    VALUES (p_host, p_account, p_purpose, p_mailbox, p_holder,
            now() + make_interval(secs => p_seconds))
    RETURNING id INTO slot;
    RETURN slot;
END $$;
