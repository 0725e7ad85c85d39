/*
 * ctrlgw's cluster-wide session ownership, for spin: claims with epochs drawn under the
 * row lock, the takeover NOTIFY, fencing of inbox and command writes, batched releases,
 * reconciliation (full and incremental rounds), dead-instance reaping and the prune.
 *
 * One controller, NI gateway instances (2; -DNI=3 for three).  Every step names the code
 * it stands for as file:function.  docs/model/README.md says what is abstracted and why;
 * docs/model/check.sh runs every property and every bad variant (make model).
 *
 * Bad variants (each must produce a counterexample):
 *   -DBAD_EPOCH_BEFORE_LOCK   nextval('session_epochs') before the row lock
 *   -DBAD_NO_INFLIGHT_GUARD   _releaseUnbound without claimInFlight
 *   -DBAD_UNFENCED_INBOX      the inbox insert without the epoch join
 *   -DBAD_INBOX_NO_KEYSHARE   the epoch join without FOR KEY SHARE
 *   -DBAD_RELEASE_ANY_EPOCH   the release UPDATE without "s.epoch = r.epoch"
 *   -DBAD_ABORT_STALE         _abortSuperseded without "row.epoch < session.epoch: not yet"
 *   -DINCREMENTAL_ONLY        no periodic full round (a finding, not a variant of the code)
 * Scope knobs: -DNI=, -DMAXCLAIMS=, -DNO_INBOX, -DNO_OUTBOX (no inbox or command writes),
 *   -DNO_DEATH, -DNO_PRUNE, -DFULL_ONLY (every round a full one; see the README),
 *   -DNOTIFY_NONE (every takeover notification is lost).
 */

#ifndef NI
#define NI 2            /* gateway instances */
#endif
#ifndef MAXCLAIMS
#define MAXCLAIMS 3     /* hellos of the controller in one run */
#endif
#define NONE 255        /* no instance */
#define FULLEVERY 2     /* a full round at least every FULLEVERY rounds */
#ifndef MAXSENDS
#define MAXSENDS 2      /* claims of the one command (attempts) */
#endif

/* ---- the database (ctrlgw/store/migrations/*.sql): the controller's sessions row ---- */
bool rowExists = false;    /* sessions row present (claim_session INSERTs it, prune deletes) */
byte rowEpoch = 0;         /* sessions.epoch; 0 is claim_session's placeholder row */
byte rowInst = NONE;       /* sessions.instance_id */
bool rowOnline = false;    /* sessions.online */
byte seq = 0;              /* the sequence session_epochs */
byte xlock = 0;            /* FOR UPDATE / DELETE holder on the row: 1 + claim number */
byte kshare = 0;           /* FOR KEY SHARE holders (inbox and outbox fences) */
bool expired[NI];          /* instances.heartbeat_at older than instance_ttl */
bool changed[NI];          /* sessions.changed_at moved since instance i's last round */

/* the one command (0003_command_outbox.sql, 0005: commands row) */
mtype = { PENDING, SENT, ACKED };
mtype cmdState = PENDING;
byte sentEpoch = 0;        /* commands.sent_epoch */
byte sends = 0;            /* commands.attempts (never undone here) */
bool cmdlock = false;      /* the commands row lock (FOR UPDATE OF c / UPDATE) */

/* ---- each instance (ctrlgw/registry.py, ctrlgw/ownership.py) ---- */
byte reg[NI];              /* ConnectionRegistry._byController: epoch of the bound connection */
byte announced[NI];        /* ConnectionRegistry._announced: the high-water mark */
byte inFlight[NI];         /* PostgresOwnership._inFlight: claims started, not yet handed over */
chan note[NI] = [1] of { byte };  /* LISTEN <schema>_takeover: epochs announced */
chan rel[NI] = [2] of { byte };   /* PostgresOwnership._releases (BatchWriter): epochs */
byte ackFrom[NI];          /* an ack of the command received on session epoch ackFrom[i] */

/* ---- the controller (its hellos and sockets) ---- */
byte claimInst[MAXCLAIMS]; /* where hello k went */
byte claimEpoch[MAXCLAIMS];/* the epoch hello k's claim committed (0: not yet) */
bool gone[MAXCLAIMS];      /* its socket is gone (closed, or half-open and timed out) */
byte started = 0;          /* hellos sent */
byte finished = 0;         /* claims handed over (ConnectionProtocol._claimed ran) */
bool done = false;         /* the controller says no more hellos: "after the last claim" */

/* ---- ghosts: what the properties talk about; the code never reads these ---- */
bool pendingBind[MAXCLAIMS + 1];  /* by epoch: committed, not yet handed to _claimed */
byte maxCommitted = 0;            /* highest epoch a claim committed */

#define quiet (done && finished == started)
/* at most one live connection of the controller in all registries together */
#if NI == 2
#define atMostOneLive (reg[0] == 0 || reg[1] == 0)
#else
#define atMostOneLive ((reg[0] == 0 || reg[1] == 0) && (reg[0] == 0 || reg[2] == 0) \
                       && (reg[1] == 0 || reg[2] == 0))
#endif

/* Something of the epoch e is live (bound) or about to be (a committed claim in flight). */
#if NI == 2
#define sessionAlive(e) (pendingBind[e] || reg[0] == (e) || reg[1] == (e))
#else
#define sessionAlive(e) (pendingBind[e] || reg[0] == (e) || reg[1] == (e) || reg[2] == (e))
#endif

/* sessions_changed trigger (0005: stamp_session_change): every round after this reads it. */
#ifdef FULL_ONLY
#define stampChange() skip
#elif NI == 2
#define stampChange() changed[0] = true; changed[1] = true
#else
#define stampChange() changed[0] = true; changed[1] = true; changed[2] = true
#endif

/* sessions_requeue trigger (0003: requeue_unacked_commands), fired by the UPDATE that
 * moves the epoch or takes the row offline. */
#define requeue() \
    if \
    :: cmdState == SENT && (sentEpoch < rowEpoch || (!rowOnline && sentEpoch == rowEpoch)) -> \
        cmdState = PENDING \
    :: else -> skip \
    fi

/* Connection.close / _finish: unbind and release the session (ownership.release). */
#define enqueueRelease(i, e) \
    if \
    :: nfull(rel[i]) -> rel[i]!(e) \
    :: full(rel[i]) -> skip  /* lost: reconciliation releases the row later */ \
    fi

#define closeBound(i) enqueueRelease(i, reg[i]); reg[i] = 0

/*
 * One hello on instance i: PostgresOwnership._claim -> claim_sessions/claim_session
 * (0005) -> ControllerProtocol._claimed (ctrlgw/protocol/connection.py).
 */
proctype Claim(byte i; byte k) {
    byte e = 0;
    bool wasOnline;

    /* ownership.py _claim: self._inFlight.setdefault(controller, []).append(flight) */
    inFlight[i]++;

#ifdef BAD_EPOCH_BEFORE_LOCK
    atomic { seq++; e = seq }
#endif
    /* 0005 claim_session: INSERT ... ON CONFLICT DO NOTHING; SELECT ... FOR UPDATE
     * (looping until the row is found: a prune may delete it in between) */
    atomic {
        xlock == 0 && kshare == 0 ->
        xlock = k + 1;
        /* the placeholder row it may insert is not visible before the commit */
        wasOnline = rowExists && rowOnline   /* current.online */
    }
    /* 0005 claim_session: new_epoch := nextval(...); UPDATE sessions ...; the
     * sessions_requeue trigger (it needs the command row lock); pg_notify if
     * current.online; COMMIT (claim_sessions' statement ends). */
    atomic {
        !cmdlock ->
#ifndef BAD_EPOCH_BEFORE_LOCK
        seq++; e = seq;
#endif
        /* the epochs strictly increase per controller (0001, 0002 comments) */
        assert(e > maxCommitted);
        maxCommitted = e;
        rowExists = true; rowEpoch = e; rowInst = i; rowOnline = true;
        stampChange();
        requeue();
        claimEpoch[k] = e;
        pendingBind[e] = true;
        xlock = 0;
        if
        :: wasOnline -> wasOnline = false;
#ifndef NOTIFY_NONE
            /* every listener, this instance too; each may miss it (LISTEN reconnects) */
            if :: nfull(note[0]) -> note[0]!e :: true fi;
            if :: nfull(note[1]) -> note[1]!e :: true fi;
#if NI == 3
            if :: nfull(note[2]) -> note[2]!e :: true fi;
#endif
#endif
            skip
        :: else -> skip
        fi
    }
    /* The claim's answer travels back (BatchWriter -> _claim's await); the credentials
     * re-check (_stillAdmitted) is abstracted: no revocation here.  Then, in one reactor
     * turn: _claim's finally removes the flight, and the Deferred's callback
     * ControllerProtocol._claimed binds. */
    atomic {
        inFlight[i]--;
        pendingBind[e] = false;
        if
        :: gone[k] ->
            /* _claimed, state is not CLAIMING: ownership.release(session);
             * registry.supersededBy(controller, epoch) closes an older local one */
            enqueueRelease(i, e);
            if :: e > announced[i] -> announced[i] = e :: else -> skip fi;
            if
            :: reg[i] != 0 && reg[i] < e -> closeBound(i)
            :: else -> skip
            fi
        :: else ->
            /* registry.py bind: announced[i] > epoch or a higher one bound: self loses,
             * closed as taken over (close releases it: state LIVE first) */
            if
            :: announced[i] > e || (reg[i] != 0 && reg[i] > e) -> enqueueRelease(i, e)
            :: else ->
                if
                :: reg[i] != 0 -> closeBound(i)   /* loser.close(BYE_TAKEOVER) */
                :: else -> skip
                fi;
                reg[i] = e
            fi
        fi;
        finished++
    }
}

/* The controller: hellos to any instance, sockets that close or are left half-open
 * (the gateway notices when idle_timeout passes: ControllerProtocol._tick -> close). */
active proctype Controller() {
    byte k;
    do
    :: !done && started < MAXCLAIMS ->
        atomic {
            if
            :: claimInst[started] = 0
            :: claimInst[started] = 1
#if NI == 3
            :: claimInst[started] = 2
#endif
            fi;
            run Claim(claimInst[started], started);
            started++
        }
    :: atomic {
        /* ControllerProtocol.connectionLost -> _finish: unbind and release */
        k = 0;
        do
        :: k < started && !gone[k] -> break
        :: k < started -> k++
        :: else -> break
        od;
        if
        :: k < started && !gone[k] ->
            gone[k] = true;
            if
            :: claimEpoch[k] != 0 && reg[claimInst[k]] == claimEpoch[k] -> closeBound(claimInst[k])
            :: else -> skip   /* still claiming: _claimed sees it is gone */
            fi
        :: else -> skip
        fi;
        k = 0
       }
    :: atomic { !done -> done = true }
    :: done -> break
    od
}

/* Instance i's LISTEN connection: Cluster.takeoverNotified -> registry.supersededBy. */
proctype Listener(byte i) {
    byte e;
    do
    :: atomic {
            note[i]?e;
            if :: e > announced[i] -> announced[i] = e :: else -> skip fi;
            if
            :: reg[i] != 0 && reg[i] < e -> closeBound(i)  /* connection.close(BYE_TAKEOVER) */
            :: else -> skip
            fi;
            e = 0
        }
    od
}

/* Instance i's release batches: PostgresOwnership.releaseRow -> Store.releaseSessions
 * (_RELEASE in ctrlgw/store/postgres.py); a NO KEY UPDATE: waits for FOR UPDATE only. */
proctype Releaser(byte i) {
    byte e;
    do
    :: atomic { rel[i]?e; e = 0 }   /* the batch fails (database away, abandoned at shutdown) */
    :: atomic {
            len(rel[i]) > 0 && xlock == 0 && !cmdlock ->
            rel[i]?e;
#ifdef BAD_RELEASE_ANY_EPOCH
            if
            :: rowExists && rowOnline ->
#else
            if
            :: rowExists && rowEpoch == e && rowOnline ->
#endif
                /* progress: nothing takes a row offline under a live session, or under a
                 * claim in flight, but the reaper (instance death) */
                assert(!sessionAlive(rowEpoch));
                rowOnline = false;
                stampChange();
                requeue()
            :: else -> skip
            fi;
            e = 0
        }
    od
}

/*
 * Instance death: instance_ttl passes without a heartbeat of instance d reaching the
 * database (a pause, a partition from the database, a crash whose sockets the controller
 * sees close); meanwhile another instance's Cluster.heartbeat -> Store.reapDeadInstances
 * (_REAP_DEAD_INSTANCES) takes d's online rows offline, as often as it finds one; then d's
 * own Store.heartbeat re-creates its instances row (d never reaps itself).
 */
#ifndef NO_DEATH
active proctype Death() {
    byte d;
    if
    :: d = 0
#ifndef DEATH0
    /* -DDEATH0: only instance 0 dies; without message traffic on instance 0 the instances
     * are symmetric, so that loses nothing */
    :: d = 1
#if NI == 3
    :: d = 2
#endif
#endif
    :: goto alive
    fi;
    expired[d] = true;
    do
    :: atomic {
        xlock == 0 && !cmdlock && rowExists && rowOnline && rowInst == d ->
        rowOnline = false;
        stampChange();
        requeue()
       }
    :: break
    od;
    expired[d] = false;
alive:
    skip
}
#endif

/*
 * Store.prune("sessions", ...): DELETE of a row offline for longer than the retention
 * (days), FOR UPDATE SKIP LOCKED.  Timing: days are far longer than any connection outlives
 * its row going offline (idle_timeout, one full reconciliation round), so the model prunes
 * a row only once no connection and no claim in flight is left anywhere.
 */
#if NI == 2
#define nothingLeft (reg[0] == 0 && reg[1] == 0 && inFlight[0] == 0 && inFlight[1] == 0)
#else
#define nothingLeft (reg[0] == 0 && reg[1] == 0 && reg[2] == 0 && inFlight[0] == 0 \
                     && inFlight[1] == 0 && inFlight[2] == 0)
#endif
#ifndef NO_PRUNE
active proctype Prune() {
    do
    :: atomic {
        xlock == 0 && kshare == 0 && rowExists && !rowOnline && nothingLeft ->
        rowExists = false; rowEpoch = 0; rowInst = NONE
       };
       break
    :: break
    od
}
#endif

/*
 * Reconciliation on instance i: Cluster.reconcile -> reconcileAll (Store.reconcile:
 * _RECONCILE_LOCAL + _RECONCILE_OWNED) or an incremental round (Store.changedSessions:
 * _CHANGED_SESSIONS, rows with changed_at after the previous round's start minus the
 * overlap), then Cluster._judge: _abortSuperseded and _releaseUnbound in one reactor turn.
 */
proctype Reconcile(byte i) {
    /* the row as the query's snapshot had it: epoch (0: not read), ours, online */
    byte sEpoch, sinceFull = FULLEVERY;  /* the first round is a full one */
    bool sOwned, fromQuiet;   /* the row says: ours and online */
    do
    :: atomic {
#ifdef FULL_ONLY
        fromQuiet = true;
#else
        if
        :: sinceFull >= FULLEVERY -> fromQuiet = true
#ifndef INCREMENTAL_ONLY
        :: sinceFull < FULLEVERY -> fromQuiet = true
#endif
        :: sinceFull < FULLEVERY -> fromQuiet = false
        fi;
#endif
        if
        :: fromQuiet ->
            /* reconcileAll: the local controllers' rows and the rows this instance owns
             * online */
            if
            :: rowExists && (reg[i] != 0 || (rowInst == i && rowOnline)) -> sEpoch = rowEpoch
            :: else -> skip
            fi;
#ifndef FULL_ONLY
            sinceFull = 0;
#endif
            fromQuiet = quiet   /* from here on: did this full round start after the last claim */
        :: else ->
            /* changedSessions: changed since the last round (the overlap's re-reads are
             * judged as a full round would judge them) */
            if :: rowExists && changed[i] -> sEpoch = rowEpoch :: else -> skip fi;
#ifndef INCREMENTAL_ONLY
            sinceFull++;
#endif
        fi;
#ifndef FULL_ONLY
        changed[i] = false;
#endif
        if :: sEpoch != 0 -> sOwned = (rowInst == i && rowOnline) :: else -> skip fi
       }
       /* the rows come back: _judge */
       atomic {
        if
        :: sEpoch != 0 ->
            /* _abortSuperseded: registry.lookup; row.epoch < session.epoch: not yet */
            if
#ifdef BAD_ABORT_STALE
            :: reg[i] != 0 && (sEpoch != reg[i] || !sOwned) ->
#else
            :: reg[i] != 0 && sEpoch >= reg[i] && (sEpoch > reg[i] || !sOwned) ->
#endif
                /* progress: the connection reconciliation drops is not the row's current
                 * online session (never the newest claimant) */
                assert(!(rowExists && rowEpoch == reg[i] && rowInst == i && rowOnline));
                closeBound(i)
            :: else -> skip
            fi;
            /* _releaseUnbound */
            if
            :: sOwned ->
                if
#ifndef BAD_NO_INFLIGHT_GUARD
                :: inFlight[i] > 0 -> skip        /* ownership.claimInFlight */
#endif
                :: reg[i] != 0 && reg[i] >= sEpoch -> skip
                :: else -> enqueueRelease(i, sEpoch)   /* releaseRow(..., "reconciled") */
                fi
            :: else -> skip
            fi
        :: else -> skip
        fi;
        /* convergence within a bound: a full round that started after the last claim was
         * handed over leaves here only the session its snapshot showed as the row's
         * current online one; epochs being unique, one instance at most keeps one */
        assert(!fromQuiet || reg[i] == 0 || (sEpoch == reg[i] && sOwned));
        sEpoch = 0; sOwned = false; fromQuiet = false
       }
    od
}

#ifndef NO_INBOX
/*
 * The inbox of instance i: ControllerProtocol._receiveMsg -> Inbox.submit (the session's
 * epoch) -> Store.writeInbox (_WRITE_INBOX).  One message per instance.
 */
proctype Inbox(byte i) {
    byte e;
    bool ok;
    /* a message arrives on the live connection */
    atomic { reg[i] != 0 -> e = reg[i] }
    /* the fence: JOIN sessions ON epoch ... FOR KEY SHARE (waits for FOR UPDATE) */
    atomic {
#ifdef BAD_INBOX_NO_KEYSHARE
        ok = rowExists && rowEpoch == e   /* the snapshot, no lock */
#else
        xlock == 0 ->
#ifdef BAD_UNFENCED_INBOX
        ok = true;
#else
        ok = rowExists && rowEpoch == e;
#endif
        kshare++
#endif
    }
    /* INSERT ... ; COMMIT */
    atomic {
        if
        :: ok ->
            /* safety: nothing stored from an epoch below the row's current one */
            assert(!rowExists || e >= rowEpoch)
        :: else ->
            /* Fenced: ControllerProtocol._notStored closes the connection */
            if :: reg[i] == e -> closeBound(i) :: else -> skip fi
        fi;
#ifndef BAD_INBOX_NO_KEYSHARE
        kshare--
#endif
    }
}
#endif

#ifndef NO_OUTBOX
/*
 * The outbox of instance i: Outbox._claimRound -> Store.claimCommands (_CLAIM_COMMANDS:
 * the fenced CTE under FOR KEY SHARE, the command row FOR UPDATE) -> Outbox._write; the
 * controller's ack -> Outbox.settle -> Store.settleCommands (_SETTLE_COMMANDS).
 */
proctype Outbox(byte i) {
    byte e;
    bool ok;
    do
    :: atomic { reg[i] != 0 && cmdState == PENDING && sends < MAXSENDS -> e = reg[i] }
       atomic {
        xlock == 0 && !cmdlock ->
        ok = (rowExists && rowEpoch == e && rowOnline && rowInst == i &&
              cmdState == PENDING);
        if :: ok -> kshare++; cmdlock = true :: else -> skip fi
       }
       atomic {
        if
        :: ok ->
            cmdState = SENT; sentEpoch = e; sends++;
            /* safety: no command claimed for an epoch below the row's current one */
            assert(!rowExists || e >= rowEpoch);
            kshare--; cmdlock = false;
            /* Outbox._write: the connection of that epoch is still bound */
            if
            :: reg[i] == e -> ackFrom[i] = e   /* written; the controller will ack */
            :: else -> skip   /* not written (unsend is abstracted: it stays sent) */
            fi
        :: else -> skip
        fi
       }
    :: atomic { ackFrom[i] != 0 && reg[i] == ackFrom[i] -> e = ackFrom[i]; ackFrom[i] = 0 }
       /* UPDATE commands ... WHERE state = 'sent' AND sent_epoch = s.epoch */
       atomic { !cmdlock -> cmdlock = true; ok = cmdState == SENT && sentEpoch == e }
       atomic {
        if
        :: ok ->
            cmdState = ACKED;
            /* safety: no settlement from an epoch below the row's current one */
            assert(!rowExists || e >= rowEpoch)
        :: else -> skip
        fi;
        cmdlock = false
       }
    :: atomic { ackFrom[i] != 0 && reg[i] != ackFrom[i] -> ackFrom[i] = 0 }  /* closed first */
    od
}
#endif

init {
    byte i = 0;
    atomic {
        do
        :: i < NI ->
            reg[i] = 0; announced[i] = 0;
            run Listener(i); run Releaser(i); run Reconcile(i);
            i++
        :: else -> break
        od;
        /* message traffic on instance 0 only: the instances are symmetric (hellos and
         * deaths pick any), so a scenario with traffic on another has its mirror here */
#ifndef NO_INBOX
        run Inbox(0);
#endif
#ifndef NO_OUTBOX
        run Outbox(0);
#endif
    }
}

/* Convergence under weak fairness (pan -a -f): in the end at most one live connection. */
ltl convergence { <> [] atMostOneLive }
