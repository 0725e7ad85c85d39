-- ctrlgw schema, version 1: instances, sessions, inbox, controllers, events.
-- Runs with search_path set to the configured schema; names are unqualified on purpose.

-- Epochs come from one sequence, so they strictly increase per controller even when a
-- session row is rewritten by another instance.
CREATE SEQUENCE session_epochs;

CREATE TABLE instances (
    instance_id   text PRIMARY KEY,
    started_at    timestamptz NOT NULL DEFAULT now(),
    heartbeat_at  timestamptz NOT NULL DEFAULT now(),
    host          text,
    pid           integer
);

-- One row per controller: its current (or last) session.
CREATE TABLE sessions (
    controller_id     text PRIMARY KEY,
    epoch             bigint NOT NULL,
    session_id        uuid NOT NULL,
    instance_id       text NOT NULL,
    listener          text NOT NULL DEFAULT '',
    peer              text NOT NULL DEFAULT '',
    online            boolean NOT NULL DEFAULT true,
    connected_at      timestamptz NOT NULL DEFAULT now(),
    last_seen_at      timestamptz NOT NULL DEFAULT now(),
    disconnected_at   timestamptz,
    disconnect_reason text
);
-- Reconciliation and crash clean-up read an instance's online sessions.
CREATE INDEX sessions_online_by_instance ON sessions (instance_id) WHERE online;

-- Messages from controllers. (controller_id, message_id) is unique within the retention
-- window: a retransmission is stored once and acked again.
CREATE TABLE inbox (
    id            bigserial PRIMARY KEY,
    controller_id text NOT NULL,
    message_id    text NOT NULL,
    device_ts     timestamptz NOT NULL,
    received_at   timestamptz NOT NULL DEFAULT now(),
    instance_id   text NOT NULL,
    epoch         bigint NOT NULL,
    body          jsonb,
    UNIQUE (controller_id, message_id)
);
CREATE INDEX inbox_received_at ON inbox (received_at);
ALTER TABLE inbox SET (autovacuum_vacuum_scale_factor = 0.02, autovacuum_analyze_scale_factor = 0.02);

-- Controllers allowed in token mode; the token itself is never stored.
CREATE TABLE controllers (
    controller_id text PRIMARY KEY,
    token_sha256  bytea NOT NULL,
    enabled       boolean NOT NULL DEFAULT true,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    note          text NOT NULL DEFAULT ''
);

-- Connection history: connect, disconnect, takeover, auth_failed.
CREATE TABLE events (
    id            bigserial PRIMARY KEY,
    at            timestamptz NOT NULL DEFAULT clock_timestamp(),
    controller_id text NOT NULL,
    kind          text NOT NULL,
    reason        text NOT NULL DEFAULT '',
    instance_id   text NOT NULL,
    epoch         bigint,
    peer          text NOT NULL DEFAULT ''
);
CREATE INDEX events_by_controller ON events (controller_id, at DESC);
CREATE INDEX events_at ON events (at);
ALTER TABLE events SET (autovacuum_vacuum_scale_factor = 0.02, autovacuum_analyze_scale_factor = 0.02);

-- Claim a controller for a new session in one round-trip.  The row lock is taken before the
-- epoch is drawn, so of any two claims the one that commits later has the higher epoch.
CREATE FUNCTION claim_session(
    p_controller text, p_session uuid, p_instance text, p_listener text, p_peer text,
    OUT new_epoch bigint, OUT previous_instance text, OUT previous_epoch bigint,
    OUT previous_online boolean)
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
BEGIN
    INSERT INTO sessions (controller_id, epoch, session_id, instance_id, online)
    VALUES (p_controller, 0, p_session, p_instance, false)
    ON CONFLICT (controller_id) DO NOTHING;

    SELECT s.instance_id, s.epoch, s.online
      INTO previous_instance, previous_epoch, previous_online
      FROM sessions s WHERE s.controller_id = p_controller FOR UPDATE;
    IF previous_epoch = 0 THEN
        previous_instance := NULL;
        previous_epoch := NULL;
    END IF;

    new_epoch := nextval('session_epochs');
    UPDATE sessions SET
        epoch = new_epoch, session_id = p_session, instance_id = p_instance,
        listener = p_listener, peer = p_peer, online = true,
        connected_at = now(), last_seen_at = now(),
        disconnected_at = NULL, disconnect_reason = NULL
    WHERE controller_id = p_controller;
END
$$;
