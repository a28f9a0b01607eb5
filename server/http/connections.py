"""Connections from clients that send slowly, or not at all, are closed instead of held forever.

uvicorn closes a kept-alive connection that stays idle after a response (`timeout_keep_alive`), but waits without
limit for a new connection's first request head, and for a request body that stops arriving: enough idle sockets
took the server off the air. `TimedH11Protocol` is uvicorn's h11 protocol with one more timer, reset by every byte
received, that closes the connection once the client has sent nothing for FLUX2_READ_TIMEOUT_S while the server is
waiting for it (the request head, or the rest of the body) — never while the server is answering (a long sync call,
a status stream). uvicorn's `limit_concurrency` (FLUX2_MAX_CONNECTIONS) answers 503 beyond the cap.

On SIGTERM, uvicorn waits for every open response to finish, status streams included (as long as their requests
run): `StoppingServer` tells the app, and the streams end at once.
"""

from __future__ import annotations

import asyncio

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol


class StoppingServer(uvicorn.Server):
    """uvicorn's server, telling the app when a stop signal comes (`app.state.stopping`): open status streams end
    then (server/http/routes/queue.py), instead of holding the shutdown; uvicorn waits for every open response."""

    def __init__(self, config: uvicorn.Config, app) -> None:
        super().__init__(config)
        self.app = app  # the FastAPI app `config` serves

    def handle_exit(self, sig, frame) -> None:
        self.app.state.stopping = True
        super().handle_exit(sig, frame)


class TimedH11Protocol(H11Protocol):
    read_timeout_s: float = 30.0  # set per server: `timed_protocol`

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._read_timer: asyncio.TimerHandle | None = None
        self._arm_read_timer()

    def data_received(self, data: bytes) -> None:
        self._arm_read_timer()
        super().data_received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
        super().connection_lost(exc)

    def _arm_read_timer(self) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
        self._read_timer = self.loop.call_later(self.read_timeout_s, self._read_timed_out)

    def _waiting_for_client(self) -> bool:
        """The client owes the server bytes: a first request head, or the rest of a body."""
        if self.conn.their_state is h11.SEND_BODY:
            return True
        return self.cycle is None and self.conn.their_state is h11.IDLE

    def _read_timed_out(self) -> None:
        self._read_timer = None
        if self.transport.is_closing():
            return
        if self._waiting_for_client():
            self.logger.info("closing a connection that sent nothing for %g s", self.read_timeout_s)
            self.transport.close()
        else:
            self._arm_read_timer()


def timed_protocol(read_timeout_s: float) -> type[TimedH11Protocol]:
    """`TimedH11Protocol` with this read timeout, for uvicorn's `http=`."""
    return type("TimedH11Protocol", (TimedH11Protocol,), {"read_timeout_s": read_timeout_s})
