"""Run the dashboard: bind the socket (so the printed address is the real one), then uvicorn.

Connections are a bounded resource, held by :func:`guarded_protocol`: at most
``max_connections`` are open (fewer when the process may open few files), a
connection that has not sent its request headers within ``HEADER_TIMEOUT_S`` is
closed, and so is one idle past ``KEEP_ALIVE_S`` between requests. At the limit,
a new connection closes the connection idle the longest (one that has sent no
request, or is between requests) rather than being refused: idle connections
cannot keep the owner out. Only when every open connection is busy (a page's
stream, a request being answered) is the new one refused. The listen backlog (which
is also how many connections asyncio accepts at once) is kept near the limit, so a
burst of connections cannot take every file descriptor before the idle are closed. Refusals, and a
failed ``accept`` (out of file descriptors), are logged as one line at a time
(:class:`Refusals`), never a traceback each.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import LoraqError
from ..workspace import Home
from .app import Settings, create_app
from .security import MAX_BODY_BYTES, check_host

log = logging.getLogger("loraq.serve")

#: Open connections at most (``loraq serve --max-connections``); a browser opens about 6 a host.
MAX_CONNECTIONS = 64
#: File descriptors kept for the rest of the server (the database, logs, reports) below the process's limit.
FD_RESERVE = 32
#: Seconds a new connection has to send its request headers; seconds a connection may idle between requests.
HEADER_TIMEOUT_S = 10.0
KEEP_ALIVE_S = 5
#: Seconds between two log lines about refused or closed connections (the first is logged at once).
REFUSAL_LOG_S = 10.0


@dataclass(frozen=True)
class Listening:
    """Where the dashboard answers, and the link (with its token) to open it."""

    host: str
    port: int
    token: str

    @property
    def base_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.base_url}/?token={self.token}"


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (``port`` 0: any free port)."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        # IPPROTO_TCP named: asyncio sets TCP_NODELAY only on sockets whose proto says TCP; with proto 0 every
        # response on a kept-alive connection waited ~40 ms (Nagle's algorithm against the client's delayed ACK)
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
    except OSError as exc:
        raise LoraqError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    sock.set_inheritable(True)
    return sock


def connection_limit(wanted: int = MAX_CONNECTIONS) -> int:
    """``wanted``, or fewer if this process may not open that many files and keep ``FD_RESERVE`` for the rest."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return wanted
    return max(1, min(wanted, soft - FD_RESERVE))


@dataclass
class Refusals:
    """Connections refused or closed at the limit, told one line at a time (at most one per ``every_s``)."""

    limit: int
    every_s: float = REFUSAL_LOG_S
    clock: Callable[[], float] = time.monotonic
    _counts: dict[str, int] = field(default_factory=dict)
    _last: float | None = None

    def note(self, what: str) -> None:
        self._counts[what] = self._counts.get(what, 0) + 1
        now = self.clock()
        if self._last is not None and now - self._last < self.every_s:
            return
        self._last = now
        self.flush()

    def flush(self) -> None:
        """Tell what is counted and not told yet (the server is stopping)."""
        if not self._counts:
            return
        told = "; ".join(f"{what} ×{n}" for what, n in self._counts.items())
        self._counts.clear()
        log.warning("loraq serve: %s (at most %d connections open; see --max-connections)", told, self.limit)


def guarded_protocol(limit: int, refusals: Refusals, header_timeout_s: float = HEADER_TIMEOUT_S) -> type[Any]:
    """uvicorn's h11 protocol with the connection limit and the header timeout (see the module's text)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class Guarded(H11Protocol):  # type: ignore[misc]  # uvicorn is not followed (Any)
        idle_since = 0.0
        header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:
            super().connection_made(transport)
            self.idle_since = self.loop.time()
            self.header_timer = self.loop.call_later(header_timeout_s, self.no_request)
            if len(self.connections) <= limit:
                return
            idle = [c for c in self.connections if isinstance(c, Guarded) and c is not self and c.is_idle()]
            if idle:
                min(idle, key=lambda c: c.idle_since).transport.close()
                refusals.note("closed the connection idle the longest")
            else:
                self.transport.close()
                refusals.note("refused a connection")

        def is_idle(self) -> bool:
            """Nothing asked, or the last answer sent: closing it loses nobody anything."""
            return not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete)

        def no_request(self) -> None:
            if self.cycle is None and not self.transport.is_closing():  # the headers never came
                self.transport.close()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self.idle_since = self.loop.time()

        def connection_lost(self, exc: Exception | None) -> None:
            if self.header_timer is not None:
                self.header_timer.cancel()
            super().connection_lost(exc)

    return Guarded


def serve(home: Home, host: str = "127.0.0.1", port: int = 8765, *, allow_remote: bool = False,
          ready: Callable[[Listening], None] | None = None, poll_s: float = 0.5,
          max_connections: int = MAX_CONNECTIONS, max_body_bytes: int = MAX_BODY_BYTES) -> None:
    """Serve the dashboard of ``home`` until interrupted. ``ready`` is told where, before the first request."""
    import uvicorn

    check_host(host, allow_remote)
    sock = bind(host, port)
    listening = Listening(host, sock.getsockname()[1], secrets.token_urlsafe(24))
    app = create_app(Settings(home=home, token=listening.token, host=host, poll_s=poll_s,
                              cookie=f"loraq-token-{listening.port}", max_body_bytes=max_body_bytes))
    limit = connection_limit(max_connections)
    refusals = Refusals(limit)
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on", timeout_graceful_shutdown=2,
                            server_header=False, http=guarded_protocol(limit, refusals),
                            timeout_keep_alive=KEEP_ALIVE_S, backlog=min(128, max(16, limit)))

    class Server(uvicorn.Server):  # type: ignore[misc]  # uvicorn is not followed (Any)
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            loop = asyncio.get_running_loop()
            loop.set_exception_handler(_accept_errors_in_one_line(refusals, loop.get_exception_handler()))
            await super().startup(sockets)
            # Told only now, with uvicorn's signal handlers in place: a Ctrl-C right after the link is printed stops
            # the server (one that came while asyncio.run's own handler was set could be lost in the startup).
            if ready is not None:
                ready(listening)

        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            app.feed.end_streams()  # open pages' streams end now, not after the graceful timeout
            await super().shutdown(sockets)
            refusals.flush()

    Server(config).run(sockets=[sock])


def _accept_errors_in_one_line(refusals: Refusals, default: Any) -> Callable[[asyncio.AbstractEventLoop, dict[str, Any]], None]:
    """asyncio logs a failed ``accept`` (no file descriptor left) with a traceback each time: one line instead."""

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if isinstance(exc, OSError) and "accept" in str(context.get("message", "")):
            refusals.note(f"could not accept a connection ({exc.strerror or exc})")
            return
        if default is not None:
            default(loop, context)
        else:
            loop.default_exception_handler(context)

    return handler
