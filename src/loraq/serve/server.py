"""Run the dashboard: bind the socket (so the printed address is the real one), then uvicorn."""

from __future__ import annotations

import secrets
import socket
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import LoraqError
from ..workspace import Home
from .app import Settings, create_app
from .security import check_host


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


def serve(home: Home, host: str = "127.0.0.1", port: int = 8765, *, allow_remote: bool = False,
          ready: Callable[[Listening], None] | None = None, poll_s: float = 0.5) -> None:
    """Serve the dashboard of ``home`` until interrupted. ``ready`` is told where, before the first request."""
    import uvicorn

    check_host(host, allow_remote)
    sock = bind(host, port)
    listening = Listening(host, sock.getsockname()[1], secrets.token_urlsafe(24))
    app = create_app(Settings(home=home, token=listening.token, host=host, poll_s=poll_s,
                              cookie=f"loraq-token-{listening.port}"))
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on", timeout_graceful_shutdown=2,
                            server_header=False)
    if ready is not None:
        ready(listening)

    class Server(uvicorn.Server):
        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            app.feed.end_streams()  # open pages' streams end now, not after the graceful timeout
            await super().shutdown(sockets)

    Server(config).run(sockets=[sock])
