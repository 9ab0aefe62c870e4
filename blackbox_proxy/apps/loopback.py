"""Running the servers: uvicorn's settings for both (:data:`UVICORN_OPTIONS`), an app on loopback
in a background thread (:class:`ServerThread`: tests, the demo, benchmarks), a free port, and the
port check that the CLI runs before loading anything (:func:`check_port`).

Left out: the routes and bodies (:mod:`.openai_http`, :mod:`.model_server`, :mod:`.tuned_server`).
"""

from __future__ import annotations

import asyncio
import errno
import socket
import threading
import time
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

from ..errors import ConfigurationError

HEADER_TIMEOUT = 10.0  # seconds a connection has to send a whole request line and headers, then closed


class HeaderDeadline(H11Protocol):
    """uvicorn's h11 protocol with a deadline on request headers: a connection that sends no
    request, or trickles its headers, is closed :data:`HEADER_TIMEOUT` seconds after it opened
    or after its last answer (uvicorn's own keep-alive timer restarts on every byte received, and
    a new connection has none). Requests being answered are never cut."""

    _header_timer: asyncio.TimerHandle | None = None
    _timed_cycle: Any = None

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.cycle is not None and self.cycle is not self._timed_cycle:  # a request's headers are in
            self._timed_cycle = self.cycle
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        if not self.transport.is_closing():
            self._header_timer = self.loop.call_later(HEADER_TIMEOUT, self._too_slow)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _too_slow(self) -> None:
        self._header_timer = None
        if self.cycle is not None and not self.cycle.response_complete:
            return  # a request is being answered (pipelined after the last one)
        if not self.transport.is_closing():
            self.transport.close()


# uvicorn's settings for both servers (ServerThread, and the CLI's uvicorn.run): a connection
# must send a request's headers within HEADER_TIMEOUT s (:class:`HeaderDeadline`), an idle
# keep-alive connection closes after 5 s, a request's headers may hold at most 64 KiB, and at
# most 256 connections are served at once (503 beyond); :func:`read_json` bounds the body's
# arrival (BODY_TIMEOUT, 408).
UVICORN_OPTIONS: dict[str, Any] = {"timeout_keep_alive": 5, "h11_max_incomplete_event_size": 64 * 1024,
                                   "limit_concurrency": 256, "timeout_graceful_shutdown": 5, "http": HeaderDeadline}



def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def check_port(host: str, port: int) -> None:
    """Raise :class:`ConfigurationError` when uvicorn could not listen on ``host``:``port``, with
    the reason: the port is busy, the host is not an address of this machine or does not
    resolve, or the port needs privileges.

    Binds as uvicorn (asyncio) does: every address ``host`` resolves to (IPv4 or IPv6), with
    SO_REUSEADDR, so a port left in TIME_WAIT by a server that just stopped counts as free.
    """
    if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
        raise ConfigurationError(f"--port must be from 1 to 65535, got {port!r}")
    try:
        addresses = socket.getaddrinfo(host or None, port, socket.AF_UNSPEC, socket.SOCK_STREAM, 0,
                                       socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, socket.gaierror) else "not a valid host name"
        raise ConfigurationError(f"cannot listen on {host!r}: the host does not resolve ({reason}); pass an address "
                                 "of this machine with --host, e.g. 127.0.0.1 or ::1") from None
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6 and hasattr(socket, "IPPROTO_IPV6"):
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as exc:
                raise ConfigurationError(_bind_error(host, port, exc)) from None


def _bind_error(host: str, port: int, exc: OSError) -> str:
    if exc.errno == errno.EADDRINUSE:
        return f"port {port} on {host} is in use by another program; pick another with --port"
    if exc.errno == errno.EADDRNOTAVAIL:
        return (f"cannot listen on {host}: it is not an address of this machine; pass one with --host "
                "(127.0.0.1 or ::1 for loopback, 0.0.0.0 for every interface)")
    if exc.errno in (errno.EACCES, errno.EPERM):
        return f"no permission to listen on port {port} on {host} (ports below 1024 need root); pick another with --port"
    return f"cannot listen on {host}:{port} ({exc.strerror}); check --host and --port"


class ServerThread:
    """Run an ASGI app with uvicorn in a background thread (tests, the demo). Context manager.

    Example::

        with ServerThread(create_app(runner), port=0) as server:
            print(server.base_url)   # http://127.0.0.1:PORT/v1
    """

    def __init__(self, app: Any, *, host: str = "127.0.0.1", port: int = 0) -> None:
        import uvicorn

        self.host = host
        self.port = port or free_port(host)
        config = uvicorn.Config(app, host=host, port=self.port, log_level="warning", lifespan="off",
                                **UVICORN_OPTIONS)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def start(self, timeout: float = 30.0) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the model server did not start on {self.host}:{self.port}")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
