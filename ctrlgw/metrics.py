"""
Every metric ctrlgw exports, defined once, on a registry that is passed in.

Names are prefixed C{ctrlgw_}; docs/operations.md lists them with what to alert on.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

# No C{_created} series next to every counter and histogram: they double the series count
# and say nothing a dashboard or an alert uses (the process start time is exported anyway).
# prometheus_client's switch is process-wide.
disable_created_metrics()

_SECONDS_FAST = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_SKEW_SECONDS = (-60, -10, -2, -0.5, -0.1, -0.02, 0, 0.02, 0.1, 0.5, 2, 10, 60)
_BATCH_SIZES = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)


class Metrics:
    """
    The gateway's metrics on one L{CollectorRegistry}.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry

        # Connections and frames.
        self.connections = Gauge(
            "ctrlgw_open_connections", "Open controller connections.", ["listener"], registry=r
        )
        self.connectionsTotal = Counter(
            "ctrlgw_connections_total", "Accepted controller connections.", ["listener"], registry=r
        )
        self.connectionsRefused = Counter(
            "ctrlgw_connections_refused_total",
            "Connections accepted and closed at once, by listener and reason (max_connections).",
            ["listener", "reason"],
            registry=r,
        )
        self.disconnects = Counter(
            "ctrlgw_disconnects_total", "Closed controller connections by reason.", ["reason"],
            registry=r,
        )
        self.takeovers = Counter(
            "ctrlgw_takeovers_total",
            "Connections superseded by a newer hello for the same controller.",
            ["scope"],
            registry=r,
        )
        self.framesIn = Counter(
            "ctrlgw_frames_in_total", "Frames received, by type.", ["type"], registry=r
        )
        self.framesOut = Counter(
            "ctrlgw_frames_out_total", "Frames written, by type.", ["type"], registry=r
        )
        self.framesDropped = Counter(
            "ctrlgw_frames_dropped_total",
            "Frames that arrived on a connection already closed on purpose (superseded, shutting down).",
            registry=r,
        )
        self.frameErrors = Counter(
            "ctrlgw_frame_errors_total", "Error frames sent, by code.", ["code"], registry=r
        )
        self.timestampRejects = Counter(
            "ctrlgw_timestamp_rejects_total",
            "Messages refused for their timestamp (stale, future).",
            ["reason"],
            registry=r,
        )
        self.expiredAtWrite = Counter(
            "ctrlgw_commands_expired_at_write_total",
            "Commands not written because they had expired when their turn came.",
            registry=r,
        )
        self.pingRoundTrip = Histogram(
            "ctrlgw_ping_round_trip_seconds",
            "Round trip of gateway pings.",
            buckets=_SECONDS_FAST,
            registry=r,
        )
        self.controllerSkew = Histogram(
            "ctrlgw_controller_clock_skew_seconds",
            "Controller clock minus gateway clock, estimated from pongs.",
            buckets=_SKEW_SECONDS,
            registry=r,
        )

        # Cluster ownership.
        self.takeoverConvergence = Histogram(
            "ctrlgw_takeover_convergence_seconds",
            "From a claim committing on one instance to the old connection dropped on another.",
            buckets=_SECONDS_FAST,
            registry=r,
        )
        self.notificationsReceived = Counter(
            "ctrlgw_takeover_notifications_total", "Takeover notifications received.", registry=r
        )
        self.reconcileAborts = Counter(
            "ctrlgw_reconcile_aborts_total",
            "Local connections dropped by reconciliation (their session was no longer ours).",
            registry=r,
        )
        self.sessionsReaped = Counter(
            "ctrlgw_sessions_reaped_total",
            "Sessions of instances silent for over instance_ttl that this instance marked"
            " offline (reason instance_dead).",
            registry=r,
        )
        self.reconcileRounds = Counter(
            "ctrlgw_reconcile_rounds_total",
            "Reconciliation rounds, by kind: full (every local session) or changed (only rows"
            " whose ownership changed since the previous round).",
            ["kind"],
            registry=r,
        )
        self.reconcileRows = Counter(
            "ctrlgw_reconcile_rows_total", "Session rows reconciliation read, by kind of round.",
            ["kind"],
            registry=r,
        )
        self.reconcileReleases = Counter(
            "ctrlgw_reconcile_releases_total",
            "Session rows released by reconciliation (ours, but no local connection).",
            registry=r,
        )
        self.flapping = Counter(
            "ctrlgw_flapping_detections_total",
            "Claims that found a controller id flapping between connections.",
            registry=r,
        )
        self.sessionsOwned = Gauge(
            "ctrlgw_sessions_owned", "Controller sessions live on this instance.", registry=r
        )

        # Command outbox.
        self.commandQueue = Gauge(
            "ctrlgw_command_queue",
            "Unfinished commands of the controllers this instance holds, by state.",
            ["state"],
            registry=r,
        )
        self.commandsFinished = Counter(
            "ctrlgw_commands_finished_total",
            "Commands that reached a final state here, by state.",
            ["state"],
            registry=r,
        )
        self.commandRetries = Counter(
            "ctrlgw_command_retries_total",
            "Commands written again (same id) after no ack within the ack timeout.",
            registry=r,
        )
        self.enqueueToWritten = Histogram(
            "ctrlgw_command_enqueue_to_written_seconds",
            "From send() committing to the cmd frame written to the controller.",
            buckets=_SECONDS_FAST,
            registry=r,
        )
        self.enqueueToAcked = Histogram(
            "ctrlgw_command_enqueue_to_acked_seconds",
            "From send() committing to the controller's ack settled.",
            buckets=_SECONDS_FAST,
            registry=r,
        )
        self.claimSeconds = Histogram(
            "ctrlgw_command_claim_seconds", "Duration of one claim statement.",
            buckets=_SECONDS_FAST, registry=r,
        )
        self.claims = Counter(
            "ctrlgw_command_claims_total",
            "Controllers claimed for, by what woke the claim (notify, poll, connect, settle,"
            " retry, requeued) and whether it found work.",
            ["source", "result"],
            registry=r,
        )
        self.claimsSkipped = Counter(
            "ctrlgw_command_claims_skipped_total",
            "Answers that claimed nothing after them: the claim that sent the command saw"
            " no pending command behind it.",
            registry=r,
        )

        # Database.
        self.dbUp = Gauge("ctrlgw_db_up", "1 when the database answers.", registry=r)
        self.dbQuerySeconds = Histogram(
            "ctrlgw_db_query_seconds", "Database calls by name.", ["query"],
            buckets=_SECONDS_FAST, registry=r,
        )
        self.dbQueryErrors = Counter(
            "ctrlgw_db_query_errors_total", "Failed database calls by name.", ["query"], registry=r
        )
        self.instanceSkew = Gauge(
            "ctrlgw_instance_clock_skew_seconds",
            "This instance's clock minus the database's clock.",
            registry=r,
        )

        # Durable inbox.
        self.inboxBatchSize = Histogram(
            "ctrlgw_inbox_batch_size", "Messages per inbox flush.", buckets=_BATCH_SIZES,
            registry=r,
        )
        self.inboxFlushSeconds = Histogram(
            "ctrlgw_inbox_flush_seconds", "Duration of an inbox flush (one statement).",
            buckets=_SECONDS_FAST, registry=r,
        )
        self.inboxRowsWritten = Counter(
            "ctrlgw_inbox_rows_written_total",
            "Inbox rows inserted (retransmitted duplicates not counted).",
            registry=r,
        )
        self.inboxDuplicates = Counter(
            "ctrlgw_inbox_duplicates_total",
            "Retransmitted messages already stored, acked again.",
            registry=r,
        )
        self.inboxBuffered = Gauge(
            "ctrlgw_inbox_buffered_unacked",
            "Messages held in memory, not yet committed and not yet acked.",
            registry=r,
        )
        self.rowsRejected = Counter(
            "ctrlgw_rows_rejected_total",
            "Rows a batch writer isolated because the database refused their content, by writer.",
            ["writer"],
            registry=r,
        )
        self.inboxBackpressure = Counter(
            "ctrlgw_inbox_backpressure_total",
            "Times a connection stopped being read because the inbox had no room for its"
            " messages (it is read again once the inbox is half empty).",
            registry=r,
        )
        self.inboxRefused = Counter(
            "ctrlgw_inbox_refused_total",
            "Messages refused with 'unavailable' because the buffer was full.",
            registry=r,
        )

        # Auth and history.
        self.authFailures = Counter(
            "ctrlgw_auth_failures_total", "Refused hellos by reason.", ["reason"], registry=r
        )
        self.revocations = Counter(
            "ctrlgw_revocations_total",
            "Sessions ended here because their controller was disabled, re-keyed or deleted,"
            " by how it was found: notified (the revocation's notification), checked (a"
            " check of every local connection, after a '*' notification) or claim (a hello"
            " whose claim raced the revocation).",
            ["scope"],
            registry=r,
        )
        self.revocationNotifications = Counter(
            "ctrlgw_revocation_notifications_total", "Revocation notifications received.",
            registry=r,
        )
        self.eventsDropped = Counter(
            "ctrlgw_events_dropped_total",
            "History events dropped because the history buffer was full.",
            registry=r,
        )
        self.pruned = Counter(
            "ctrlgw_pruned_rows_total", "Rows removed by retention, by table.", ["table"],
            registry=r,
        )

        # Dialects: timestamps stored with a flag, and device requests answered by applications.
        self.timestampsFlagged = Counter(
            "ctrlgw_timestamps_flagged_total",
            "Messages stored although their timestamp is outside the listener's policy"
            " (stale, future): dialects whose devices replay old records by design.",
            ["reason"],
            registry=r,
        )
        self.repliesWaiting = Gauge(
            "ctrlgw_replies_waiting",
            "Device requests stored and waiting for an application's reply().",
            registry=r,
        )
        self.replies = Counter(
            "ctrlgw_replies_total",
            "Replies to device requests, by outcome: written, invalid (not valid for the"
            " request; the device got an error), timed_out (none within reply_timeout),"
            " late (arrived after the request was given up or its session ended).",
            ["outcome"],
            registry=r,
        )

        # The garbage collector on the gateway's schedule (ctrlgw.gcpolicy).
        self.gcSeconds = Histogram(
            "ctrlgw_gc_seconds",
            "Pauses of Python's cyclic garbage collector, by generation collected (2: full).",
            ["generation"],
            buckets=_SECONDS_FAST,
            registry=r,
        )

        # Readiness, drains and kicks (docs/operations.md#readiness-drains-and-kicks).
        self.ready = Gauge(
            "ctrlgw_ready",
            "1 while every readiness check passes (what /readyz answers 200 for), else 0.",
            registry=r,
        )
        self.kicks = Counter(
            "ctrlgw_kicks_total",
            "Connections closed here because a kick (ctrlgw kick, DELETE"
            " /v1/controllers/{id}/connection) ended their session.",
            registry=r,
        )
        self.draining = Gauge(
            "ctrlgw_draining", "1 from a drain request (ctrlgw drain) on, else 0.", registry=r
        )
        self.drainHandedOver = Counter(
            "ctrlgw_drain_handed_over_total",
            "Connections a drain closed with bye shutdown, for them to reconnect elsewhere.",
            registry=r,
        )
        # The application stream (docs/consuming.md).
        self.streamRead = Counter(
            "ctrlgw_stream_entries_read_total",
            "Stream entries handed out by this instance (SSE and ctrlgw tail), by group.",
            ["group"],
            registry=r,
        )
        self.streamBehind = Gauge(
            "ctrlgw_stream_group_behind_entries",
            "Entries a consumer group has not taken yet: counted up to 10,000, estimated from"
            " the positions drawn past that, at most [stream] max_entries.",
            ["group"],
            registry=r,
        )
        self.streamPending = Gauge(
            "ctrlgw_stream_group_pending_entries",
            "Entries a consumer group has taken and not acked (leased or waiting).",
            ["group"],
            registry=r,
        )
        self.streamDropped = Gauge(
            "ctrlgw_stream_group_dropped_entries",
            "Entries retention removed over [stream] max_entries before the group acked them"
            " (since the group was created).",
            ["group"],
            registry=r,
        )
        self.streamRetained = Counter(
            "ctrlgw_stream_retention_deleted_total", "Stream entries removed by retention.",
            registry=r,
        )

        # Time partitions of inbox and events (ctrlgw/partitions.py, docs/scaling.md).
        self.partitionsCreated = Counter(
            "ctrlgw_partitions_added_total",
            "Time partitions this instance created ahead, by table.", ["table"], registry=r,
        )
        self.partitionsDropped = Counter(
            "ctrlgw_partitions_dropped_total",
            "Time partitions this instance dropped whole (retention), by table.", ["table"],
            registry=r,
        )
        self.partitionsAhead = Gauge(
            "ctrlgw_partitions_ahead_seconds",
            "How far past now the table's partitions reach (the newest upper bound), as of the"
            " last partition job; inserts past it fail.",
            ["table"],
            registry=r,
        )
        self.partitionsCount = Gauge(
            "ctrlgw_partitions", "Time partitions the table has, as of the last partition job.",
            ["table"], registry=r,
        )
