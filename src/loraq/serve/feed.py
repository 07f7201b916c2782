"""The change feed: what changed in the home's store, noticed cheaply, told to every open page.

One thread holds one read-only connection. Each poll asks SQLite ``PRAGMA
data_version``, which changes only when another connection committed; only then
does it read the jobs whose ``seq`` moved past the last one seen (migration 3: an
index range, in proportion to the jobs that changed) and the queue's pause state.
The totals the queue page shows (jobs by status, by sweep) are kept here and moved
by the changed rows, so an update never counts every job again.

``poll`` is one step, with no thread and no sleep: tests call it directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import LoraqError
from ..queue.records import STATES, QueueState
from ..queue.store import Store
from ..workspace import Home

#: At most this many changed jobs in one update; a bigger burst (a submit of thousands)
#: arrives over the next polls.
BATCH = 500


@dataclass(frozen=True)
class Change:
    """One poll's news: the rows of the jobs that changed, and the totals after them."""

    seq: int  # the newest change included
    rows: list[dict[str, Any]]  # Store.listing rows, in the order they changed
    counts: dict[str, int]
    groups: dict[str, dict[str, int]]
    queue: QueueState | None
    payload: Any = None  # what ``prepare`` made of it, once for every page


@dataclass
class Feed:
    home: Home
    poll_s: float = 0.5
    prepare: Callable[[Change], Any] | None = None
    _store: Store | None = field(default=None, repr=False)
    _version: int | None = None
    seq: int = 0
    _known: dict[int, tuple[str, str | None]] = field(default_factory=dict, repr=False)
    counts: dict[str, int] = field(default_factory=lambda: {k: 0 for k in STATES})
    groups: dict[str, dict[str, int]] = field(default_factory=dict)
    queue: QueueState | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _subscribers: list[tuple[asyncio.AbstractEventLoop, asyncio.Queue[Change | None]]] = field(default_factory=list, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    error: str | None = None  # why the last poll failed, if it did (shown on the pages)

    # ---------------------------------------------------------------- one step

    def poll(self) -> Change | None:
        """Read what changed since the last poll; ``None`` if nothing did."""
        if self._store is None:
            if not self.home.db_path.exists():  # nothing submitted yet: never create the database
                return None
            self._open()
            return None
        store = self._store
        version = int(store.conn.execute("PRAGMA data_version").fetchone()[0])
        if version == self._version:
            return None
        with store.snapshot():
            rows = store.changed_since(self.seq, limit=BATCH)
            queue = store.queue_state()
        if len(rows) < BATCH:  # else the rest comes at the next poll, though nothing new is committed
            self._version = version
        if not rows and queue == self.queue:
            return None
        with self._lock:
            for row in rows:
                self._count(row["id"], row["status"], row["grp"])
            if rows:
                self.seq = max(self.seq, max(int(row["seq"]) for row in rows))
            self.queue = queue
            change = Change(self.seq, rows, dict(self.counts), {g: dict(c) for g, c in self.groups.items()}, queue)
        if self.prepare is not None:
            change = Change(change.seq, change.rows, change.counts, change.groups, change.queue, self.prepare(change))
        return change

    def _open(self) -> None:
        store = Store.open(self.home.db_path, readonly=True)
        with store.snapshot():
            self._version = int(store.conn.execute("PRAGMA data_version").fetchone()[0])
            # The one full read, when the feed starts: every later update moves these totals.
            rows = store.listing()
            self.queue = store.queue_state()
        with self._lock:
            for row in rows:
                self._count(int(row["id"]), row["status"], row["grp"])
            self.seq = max((int(row["seq"]) for row in rows), default=0)
        self._store = store

    def _count(self, job_id: int, status: str, group: str | None) -> None:
        before = self._known.get(job_id)
        if before is not None:
            self.counts[before[0]] -= 1
            if before[1] is not None:
                self.groups[before[1]][before[0]] -= 1
        self._known[job_id] = (status, group)
        self.counts[status] = self.counts.get(status, 0) + 1
        if group is not None:
            self.groups.setdefault(group, {k: 0 for k in STATES})[status] += 1

    def totals(self) -> tuple[int, dict[str, int], dict[str, dict[str, int]], QueueState | None]:
        with self._lock:
            return self.seq, dict(self.counts), {g: dict(c) for g, c in self.groups.items()}, self.queue

    # ---------------------------------------------------------------- the thread and the pages

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="loraq-serve-feed", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.end_streams()
        if self._thread is None:
            self.close()

    def end_streams(self) -> None:
        """Tell every open page's stream to end (the server is stopping: it should not wait on them)."""
        with self._lock:
            subscribers = list(self._subscribers)
        for loop, queue in subscribers:
            with contextlib.suppress(RuntimeError):  # a loop already closed
                loop.call_soon_threadsafe(queue.put_nowait, None)

    def close(self) -> None:
        """Close the connection (from the thread that polls: SQLite connections stay in theirs)."""
        if self._store is not None:
            self._store.close()
            self._store = None

    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    change = self.poll()
                    self.error = None
                except (LoraqError, sqlite3.Error) as exc:  # a damaged or vanished file: say so on the pages, retry
                    self.error = str(exc)
                    change = None
                    self.close()
                if change is not None:
                    self._publish(change)
                self._stop.wait(self.poll_s if change is None or len(change.rows) < BATCH else 0)
        finally:
            self.close()

    def subscribe(self) -> asyncio.Queue[Change | None]:
        """A queue of changes for the calling event loop; ``None`` in it means the feed stopped."""
        queue: asyncio.Queue[Change | None] = asyncio.Queue(maxsize=256)
        with self._lock:
            self._subscribers.append((asyncio.get_running_loop(), queue))
        return queue

    def unsubscribe(self, queue: asyncio.Queue[Change | None]) -> None:
        with self._lock:
            self._subscribers = [(loop, q) for loop, q in self._subscribers if q is not queue]

    def _publish(self, change: Change) -> None:
        with self._lock:
            subscribers = list(self._subscribers)
        for loop, queue in subscribers:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_offer, queue, change)


def _offer(queue: asyncio.Queue[Change | None], change: Change) -> None:
    """Hand ``change`` to one page; a page too slow to keep up is told to reload instead."""
    try:
        queue.put_nowait(change)
    except asyncio.QueueFull:
        with contextlib.suppress(asyncio.QueueEmpty):
            while True:
                queue.get_nowait()
        queue.put_nowait(None)
