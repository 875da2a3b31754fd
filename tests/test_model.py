"""A model-based test of the queue contract: hypothesis drives a real client against a model.

``QueueMachine`` runs a real ``DurableWhisperr`` on a real SQLite file (a fresh temporary
directory per example) and answers its requests with ``httpx.MockTransport`` according to a
server mode the machine sets: ``ok`` (202, except 400 for a batch holding a "poison" event,
like an older server that refused a whole batch for one bad event), ``400``, ``401``,
``503`` or ``net`` (``httpx.ConnectError``). Beside it runs ``Model``, a plain in-memory FIFO
that says what the contract requires: which requests go out, in which order and with which
events; what is delivered, dead-lettered, evicted and still queued; what ``flush()`` returns
and what ``on_error`` hears.

Steps: tracks (valid, and invalid calls that must never be queued), identifies, flushes
under a server mode, tracks made by the fake server while a request is in flight (so they
evict ops queued behind the batch being sent, never the batch itself, and prove no
transaction is open meanwhile), a
graceful restart (``shutdown()`` flushes, a new client opens the file) and an abrupt one
(nothing can be sent; optionally the head batch is left leased by a sender that is gone, as
a kill during a request leaves it, which the next client must take over at once).

The machine holds the sender-leadership lock (the ``flock`` file beside the outbox, exactly
as another process sending this key's ops would) except during an explicit ``flush()`` or a
graceful restart, and takes it back before the next step. So the background thread sends
only when the model says it may, and a drain that was still running when ``flush()``
returned has finished (its reports included) before anything is checked. While the machine
lets go, the lock still looks taken to the sender until that ``flush()`` has begun: a cycle
woken earlier (by a flush that had returned before the thread ran it) must not lead first.

Checked after every step: the outbox's rows and ``stats()`` against the model's queue and
counters; every request the server saw against the model's requests (path, events, status);
delivered events in order; dead letters in order; the exact sequence of ``on_error``
reports; and that every op travelled with one body and one ``$message_id``, across retries,
splits and restarts.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Optional

import filelock
import httpx
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

import whisperr_durable._sender
from whisperr_durable import DurableWhisperr, WhisperrError
from whisperr_durable._client import key_fingerprint
from whisperr_durable._lock import lock_path
from whisperr_durable._store import queue_table

API_KEY = "wrk_model_key"
QUEUE = queue_table(key_fingerprint(API_KEY))  # this key's queue table in the outbox
BASE_URL = "http://whisperr.test"
BATCH = "/v1/events/batch"
IDENTIFY = "/v1/identify"
TRACK_KIND = "track"
IDENTIFY_KIND = "identify"
# About one event in four is "poison".
POISON = st.sampled_from([False, False, False, True])
# "ok" twice: delivery should make progress in about half the flushes.
SERVER_MODES = st.sampled_from(("ok", "ok", "400", "401", "503", "net"))

USERS = st.sampled_from(["u1", "u2", "user_8842"])
EVENT_NAMES = ("signup", "payment_failed", "a1")
EVENT_TYPES = st.sampled_from(EVENT_NAMES)
BAD_EVENT_TYPES = st.sampled_from(["", "   ", "Payment", "payment-failed", "a__b", "_a", "a b"])


def answer(mode: str, path: str, poisoned: bool) -> Optional[int]:
    """The status the fake server gives (``None``: the connection fails)."""
    if mode == "ok":
        return 400 if path == BATCH and poisoned else 202
    if mode == "net":
        return None
    return int(mode)


def is_2xx(status: Optional[int]) -> bool:
    return status is not None and 200 <= status < 300


def seq_of(body: dict[str, Any]) -> int:
    """The model's sequence number carried by a stored or sent op."""
    if "event_type" in body:
        return int(body["properties"]["seq"])
    return int(body["traits"]["seq"])


@dataclass(frozen=True)
class Op:
    seq: int
    kind: str
    poison: bool = False


@dataclass(frozen=True)
class Sent:
    """One request: where it went, which ops it carried, what it got."""

    path: str
    seqs: tuple[int, ...]
    status: Optional[int]


Report = tuple[str, Optional[int]]  # (WhisperrError.type, status)


class Model:
    """The queue contract, in memory."""

    def __init__(self, max_queue_size: int, max_batch_size: int) -> None:
        self.max_queue_size = max_queue_size
        self.max_batch_size = max_batch_size
        self.queue: deque[Op] = deque()
        self.ids: dict[Op, int] = {}  # each queued op's id in the outbox
        self.leased: set[Op] = set()  # the batch a request is delivering
        self.requests: list[Sent] = []
        self.delivered: list[int] = []
        self.dead: list[int] = []
        self.evicted = 0
        self.reports: list[Report] = []
        # Tracks the server's next request brings about, while it is in flight.
        self.inject: list[Op] = []

    def append(self, op: Op) -> None:
        # The outbox gives an op the id after the newest queued one (ids start again in an
        # empty queue) and evicts by id window: every op with an id at or below
        # newest - max_queue_size, except those of a batch on its way to the server (they
        # stay until their sender acks or gives them back; the next append evicts them
        # then if they are still too old).
        op_id = max(self.ids.values(), default=0) + 1
        self.queue.append(op)
        self.ids[op] = op_id
        cutoff = op_id - self.max_queue_size
        victims = [o for o in self.queue if self.ids[o] <= cutoff and o not in self.leased]
        for victim in victims:
            self._discard(victim)
        if victims:
            self.evicted += len(victims)
            self.reports.append(("dropped", None))

    def invalid_call(self) -> None:
        self.reports.append(("dropped", None))

    def flush(self, mode: str) -> tuple[int, Optional[str]]:
        """Drain from the head: (ops still queued, reason), as ``FlushResult`` says.

        The drain goes on through ops added while it runs; the result counts only those
        that were queued when the flush began.
        """
        before = set(self.queue)
        while self.queue:
            failure = self._deliver(mode, self.head())
            if failure is not None:
                left = sum(op in before for op in self.queue)
                # All of them evicted meanwhile: nothing of this flush is pending.
                return (left, failure) if left else (0, None)
        return 0, None

    def head(self) -> list[Op]:
        if self.queue[0].kind == IDENTIFY_KIND:
            return [self.queue[0]]  # alone: a barrier
        batch: list[Op] = []
        for op in self.queue:
            if op.kind != TRACK_KIND or len(batch) == self.max_batch_size:
                break
            batch.append(op)
        return batch

    def _deliver(self, mode: str, batch: list[Op]) -> Optional[str]:
        """Send the head batch: ``None`` when it is done with, else why delivery stopped.

        A 400 on several events splits them in halves, first half first, down to single
        events; a single event refused goes to the dead letters. The batch is leased while
        it is delivered: no eviction touches it.
        """
        self.leased = set(batch)
        try:
            todo = [batch]
            while todo:
                part = todo.pop()
                status = self._request(mode, part)
                if is_2xx(status):
                    for op in part:
                        self._discard(op)
                        self.delivered.append(op.seq)
                elif status == 400 and len(part) > 1:
                    half = len(part) // 2
                    todo += [part[half:], part[:half]]
                elif status == 400:
                    self._discard(part[0])
                    self.dead.append(part[0].seq)
                    self.reports.append(("dropped", 400))
                elif status == 401:
                    assert part is batch  # the mode does not change within a flush
                    self.reports.append(("auth", 401))
                    return "auth"
                else:
                    assert part is batch
                    self.reports.append(("retry_exhausted", status))  # max_retries=0
                    return "retry_exhausted"
            return None
        finally:
            self.leased = set()

    def _request(self, mode: str, part: list[Op]) -> Optional[int]:
        path = IDENTIFY if part[0].kind == IDENTIFY_KIND else BATCH
        status = answer(mode, path, any(op.poison for op in part))
        self.requests.append(Sent(path, tuple(op.seq for op in part), status))
        inject, self.inject = self.inject, []
        for op in inject:  # while the request is in flight: may evict ops queued behind it
            self.append(op)
        return status

    def _discard(self, op: Op) -> None:
        self.queue.remove(op)
        del self.ids[op]


class QueueMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="whisperr-model-")
        self.path = os.path.join(self.dir, "outbox.db")
        self.mode = "ok"
        self.seq = 0
        self.model = Model(1, 1)  # replaced by start()
        self.client: Optional[DurableWhisperr] = None
        self.options: dict[str, Any] = {}
        # What the fake server saw, written by the sender thread.
        self.wire_lock = threading.Lock()
        self.sent: list[Sent] = []
        self.bodies: dict[int, set[str]] = {}  # seq -> every distinct body it was sent with
        self.message_ids: dict[str, int] = {}  # $message_id -> seq
        self.problems: list[str] = []
        self.reports: list[Report] = []
        self.inject: list[Op] = []  # tracked by the fake server during its next request
        self.leader = filelock.FileLock(
            lock_path(self.path, key_fingerprint(API_KEY)), thread_local=False
        )
        self._lead()
        # The "400" mode refuses every request; the sender's pacing of refusals in a row
        # (tested on its own) is not part of the queue contract modelled here.
        self._free_refusals = whisperr_durable._sender._FREE_REFUSALS
        whisperr_durable._sender._FREE_REFUSALS = 10**9

    # ---- the fake server, on_error, leadership ----

    def handle(self, request: httpx.Request) -> httpx.Response:
        mode = self.mode
        path = request.url.path
        try:
            doc = json.loads(request.content)
            items = doc["events"] if path == BATCH else [doc]
            seqs = tuple(seq_of(item) for item in items)
            poisoned = any(item.get("properties", {}).get("poison") for item in items)
        except Exception as exc:  # an assertion here would only look like a network error
            with self.wire_lock:
                self.problems.append(f"unreadable request to {path}: {exc!r}")
            return httpx.Response(400)
        status = answer(mode, path, poisoned)
        with self.wire_lock:
            if request.headers.get("X-API-Key") != API_KEY:
                self.problems.append(f"request to {path} without the key")
            if path not in (BATCH, IDENTIFY):
                self.problems.append(f"request to unknown path {path}")
            self.sent.append(Sent(path, seqs, status))
            for seq, item in zip(seqs, items):
                self.bodies.setdefault(seq, set()).add(json.dumps(item, sort_keys=True))
                if path == BATCH:
                    mid = item.get("context", {}).get("$message_id")
                    if not mid:
                        self.problems.append(f"event {seq} has no $message_id")
                    elif self.message_ids.setdefault(mid, seq) != seq:
                        self.problems.append(
                            f"events {seq} and {self.message_ids[mid]} share {mid}"
                        )
            inject, self.inject = self.inject, []
        for op in inject:
            # From the sender thread, mid-request: no transaction may be open now, or this
            # would wait out store_timeout and count a store error.
            assert self.client is not None
            self.client.track("u1", "signup", {"seq": op.seq, "poison": op.poison})
        if status is None:
            raise httpx.ConnectError("connection refused", request=request)
        return httpx.Response(status, json={})

    def on_error(self, error: WhisperrError) -> None:
        self.reports.append((error.type, error.status))

    def _lead(self) -> None:
        # Waits for the sender to end the cycle it is in (a drain that goes on after flush()
        # returned, with its reports); then no cycle of it can send until we let go.
        self.leader.acquire(timeout=10, poll_interval=0.001)

    def _new_client(self) -> DurableWhisperr:
        client = DurableWhisperr(
            API_KEY,
            path=self.path,
            base_url=BASE_URL,
            transport=httpx.MockTransport(self.handle),
            on_error=self.on_error,
            **self.options,
        )
        _lead_only_for_a_flush(client)
        return client

    def _stop(self, client: DurableWhisperr, *, graceful: bool) -> tuple[int, Optional[str]]:
        if graceful:
            self.leader.release()
            try:
                result = client.shutdown(timeout=10)
            finally:
                self._lead()
        else:
            result = client.shutdown(timeout=0)  # we lead: nothing can be sent
        # shutdown() waits at most 1 s for the thread; make sure no old sender lingers.
        thread = client._sender._thread
        if thread is not None:
            thread.join(10)
            assert not thread.is_alive()
        return result.pending, result.reason

    # ---- rules ----

    @initialize(max_queue_size=st.integers(4, 10), max_batch_size=st.integers(1, 4))
    def start(self, max_queue_size: int, max_batch_size: int) -> None:
        self.options = {
            "flush_at": 1_000_000,
            "flush_interval": 3600.0,
            # A lease (request_timeout + 5 s) longer than any example: the sender never
            # takes the machine's hold on the lock for a stalled sender's.
            "request_timeout": 120.0,
            "max_retries": 0,
            "max_queue_size": max_queue_size,
            "max_batch_size": max_batch_size,
            "max_dead_letters": 100_000,
        }
        self.model = Model(max_queue_size, max_batch_size)
        self.client = self._new_client()

    def _next_seq(self) -> int:
        self.seq += 1
        return self.seq

    @rule(user=USERS, event_type=EVENT_TYPES, poisons=st.lists(POISON, min_size=1, max_size=4))
    def track(self, user: str, event_type: str, poisons: list[bool]) -> None:
        """One or more tracks in a row (a poison event is refused by the server in "ok" mode)."""
        assert self.client is not None
        for poison in poisons:
            seq = self._next_seq()
            self.client.track(user, event_type, {"seq": seq, "poison": poison})
            self.model.append(Op(seq, TRACK_KIND, poison))

    @rule(user=USERS, plan=st.sampled_from(["free", "pro"]))
    def identify(self, user: str, plan: str) -> None:
        assert self.client is not None
        seq = self._next_seq()
        self.client.identify(user, traits={"seq": seq, "plan": plan})
        self.model.append(Op(seq, IDENTIFY_KIND))

    @rule(user=st.sampled_from(["", "u1"]), event_type=BAD_EVENT_TYPES | EVENT_TYPES)
    def track_invalid(self, user: str, event_type: str) -> None:
        """A bad event type or an empty user id: never queued, reported as dropped."""
        assert self.client is not None
        if user and event_type in EVENT_NAMES:
            event_type = "Not_Valid"  # something must be wrong with the call
        self.client.track(user, event_type, {"seq": -1})
        self.model.invalid_call()

    @rule(mode=SERVER_MODES)
    def flush(self, mode: str) -> None:
        """The server is in ``mode`` from now on; flush() drains as far as it lets it."""
        assert self.client is not None
        self.mode = mode
        expected = self.model.flush(mode)
        self.leader.release()
        try:
            result = self.client.flush(timeout=3)
        finally:
            self._lead()
        got = (result.pending, result.reason)
        assert got == expected, (got, expected)

    @rule(poisons=st.lists(POISON, min_size=1, max_size=4))
    def track_during_next_request(self, poisons: list[bool]) -> None:
        """Tracks that arrive while the next request is in flight (they may evict its ops)."""
        ops = [Op(self._next_seq(), TRACK_KIND, poison) for poison in poisons]
        self.inject.extend(ops)
        self.model.inject.extend(ops)

    # shutdown() stops the drain as soon as the ops queued before it are done, so ops
    # tracked meanwhile may or may not go out: keep graceful restarts deterministic.
    @precondition(lambda self: not self.inject)
    @rule(mode=SERVER_MODES)
    def restart_graceful(self, mode: str) -> None:
        """shutdown() flushes (as flush() does), then a new client opens the same file."""
        assert self.client is not None
        self.mode = mode
        expected = self.model.flush(self.mode)
        assert self._stop(self.client, graceful=True) == expected
        self.client = self._new_client()

    @rule(crashed_mid_request=st.booleans())
    def restart_abrupt(self, crashed_mid_request: bool) -> None:
        """A shutdown that cannot send: the next client finds the queue exactly as it was.

        ``crashed_mid_request``: the file is left as a sender killed during a request leaves
        it, the head batch leased by an owner that is gone. The next client, leading, must
        take those rows over at once rather than wait out the lease.
        """
        assert self.client is not None
        left = len(self.model.queue)
        expected = (left, "timeout") if left else (0, None)
        assert self._stop(self.client, graceful=False) == expected
        if crashed_mid_request and self.model.queue:
            self._lease_head_to_a_dead_sender(len(self.model.head()))
            # Its lease looks live: eviction leaves those rows alone until a sender that
            # leads takes them over.
            self.model.leased = set(self.model.head())
        self.client = self._new_client()

    def _lease_head_to_a_dead_sender(self, rows: int) -> None:
        # What a claim writes: owner and a wall-clock expiry inside the lease a sender gives
        # (request_timeout + 5 s), and longer than any example, so it looks like a live lease
        # to anyone not leading.
        conn = sqlite3.connect(self.path, timeout=5)
        try:
            with conn:
                ((first, last, changed),) = conn.execute(
                    f"SELECT min(id), max(id), count(*) FROM (SELECT id FROM {QUEUE} "
                    "ORDER BY id LIMIT ?)",
                    (rows,),
                ).fetchall()
                conn.execute(
                    "INSERT OR REPLACE INTO leases (key_fp, owner, first_id, last_id, until_ms) "
                    "VALUES (?, 'pid-of-a-dead-sender', ?, ?, ?)",
                    (key_fingerprint(API_KEY), first, last, int(time.time() * 1000) + 100_000),
                )
        finally:
            conn.close()
        assert changed == rows

    # ---- invariants ----

    def _stored(self) -> list[tuple[int, int]]:
        """``(id, seq)`` of every queued op, in id order."""
        conn = sqlite3.connect(self.path)
        try:
            rows = conn.execute(f"SELECT id, body FROM {QUEUE} ORDER BY id").fetchall()
        finally:
            conn.close()
        return [(op_id, seq_of(json.loads(body))) for op_id, body in rows]

    @invariant()
    def outbox_matches_model(self) -> None:
        if self.client is None:
            return
        model = self.model
        stats = self.client.stats()
        tracks = sum(op.kind == TRACK_KIND for op in model.queue)
        assert (stats.pending_tracks, stats.pending_identifies) == (
            tracks,
            len(model.queue) - tracks,
        )
        assert stats.pending == len(model.queue)
        assert stats.evicted == model.evicted
        assert stats.dead_letters == len(model.dead)
        assert stats.store_errors == 0
        stored = self._stored()
        assert [seq for _, seq in stored] == [op.seq for op in model.queue]
        # The ids the outbox bounds the queue by are the model's.
        assert [op_id for op_id, _ in stored] == [model.ids[op] for op in model.queue]
        dead = self.client.dead_letters(limit=100_000)
        assert [seq_of(json.loads(d.body)) for d in dead] == model.dead
        assert {(d.status, d.reason) for d in dead} <= {(400, "HTTP 400")}

    @invariant()
    def wire_matches_model(self) -> None:
        with self.wire_lock:
            assert not self.problems
            sent = list(self.sent)
            assert all(len(bodies) == 1 for bodies in self.bodies.values()), self.bodies
        assert sent == self.model.requests
        delivered = [seq for s in sent if is_2xx(s.status) for seq in s.seqs]
        assert delivered == self.model.delivered
        assert len(set(delivered)) == len(delivered)  # every mode here answers deterministically

    @invariant()
    def reports_match_model(self) -> None:
        assert self.reports == self.model.reports

    def teardown(self) -> None:
        try:
            if self.client is not None:
                self._stop(self.client, graceful=False)
        finally:
            self.leader.release(force=True)
            shutil.rmtree(self.dir, ignore_errors=True)
            whisperr_durable._sender._FREE_REFUSALS = self._free_refusals


def _lead_only_for_a_flush(client: DurableWhisperr) -> None:
    """Have the client's sender lead only once a flush() (or shutdown()) has begun.

    The machine lets go of the lock for a flush, and the model has the sender send what that
    flush asks for, and nothing before it. But the thread may run a cycle in between that no
    flush of this step asked for: the one a flush() that returned at once (nothing pending)
    woke it for, when the thread had not got to run it before the machine took the lock back;
    or a 0.1 s poll it set while a flush was still waiting. Leading before the flush has
    begun and refused (401, 503, network), that cycle reports and pauses the sender; the flush
    then tries again at once, as an explicit flush does: one request and one report more
    than the model has. So until a flush is waiting on the sender (registered, once it has
    reset the backoff), the lock answers the sender as it would while the machine held it:
    taken. A cycle that leads after that is the one the flush asked for.
    """
    sender = client._sender
    try_acquire = sender._lock.try_acquire

    def lead_if_flushing() -> Optional[bool]:
        with sender._cond:
            flushing = sender._waiters > 0
        return try_acquire() if flushing else False

    sender._lock.try_acquire = lead_if_flushing  # type: ignore[method-assign]


TestQueueModel = QueueMachine.TestCase
TestQueueModel.settings = settings(
    max_examples=50,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def test_flush_result_is_not_stale_after_eviction_in_flight(db_path: str) -> None:
    """A race made to happen every time: the count flush() returns is taken after the block.

    flush() reads the pending count, then checks whether the sender got blocked. If tracks
    evict an op while the failing request is in flight, and the sender reports the failure
    between those two steps, flush() must not return the count from before the eviction.
    """
    first_read = threading.Event()

    def handle(request: httpx.Request) -> httpx.Response:
        first_read.wait(5)  # flush() has counted the pending ops once
        # The queue is full: the second evicts the oldest op not in this request.
        client.track("u1", "signup", {"late": 1})
        client.track("u1", "signup", {"late": 2})
        return httpx.Response(503)

    client = DurableWhisperr(
        API_KEY,
        path=db_path,
        base_url=BASE_URL,
        transport=httpx.MockTransport(handle),
        flush_at=1_000_000,
        flush_interval=3600.0,
        max_retries=0,
        max_queue_size=4,
        max_batch_size=1,
    )
    try:
        for i in range(4):
            client.track("u1", "signup", {"i": i})
        sender = client._sender
        sender_flush = sender.flush

        def flush_reading_slowly(
            pending: Callable[[bool], int], timeout: Optional[float], *, retry: bool = True
        ) -> Any:
            # Widen the window between reading the count and checking for a block: the
            # first read waits until the sender has reported the failure.
            def slow_pending(exact: bool) -> int:
                count = pending(exact)
                if not first_read.is_set():
                    first_read.set()
                    with sender._cond:
                        assert sender._cond.wait_for(lambda: sender._blocked > 0, 5)
                return count

            return sender_flush(slow_pending, timeout, retry=retry)

        sender.flush = flush_reading_slowly  # type: ignore[method-assign]
        result = client.flush(timeout=5)
        assert result.reason == "retry_exhausted"
        # The one in flight, the two behind it that were not evicted, and the late two.
        assert client.stats().pending == 5
        assert result.pending == 3  # of the four flushed, counted after the eviction
    finally:
        client.shutdown(timeout=0)
