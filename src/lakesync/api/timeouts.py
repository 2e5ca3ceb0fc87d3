"""Read deadlines: a client must send a request's head, then its body, within a time limit.

uvicorn's h11 protocol times out idle kept-alive connections but not a request that
arrives slowly: a client sending one header byte now and then (slowloris) holds its
connection, a socket and the server's memory for as long as it likes, and a few thousand
of them hold the server. This protocol closes a connection whose request head is not
complete HEAD_SECONDS after its first byte (or after the connection opened), or whose body
is not complete BODY_SECONDS after its head. Time the server itself takes (the app not
reading yet) never counts against the client: the deadline is paused while reading is.
"""

from __future__ import annotations

import asyncio
import logging

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

logger = logging.getLogger(__name__)

HEAD_SECONDS = 10.0  # the request line and headers, from the first byte or the connection
BODY_SECONDS = 20.0  # the body, from the end of the head (bodies here are <= 64 KiB JSON)

_READING = (h11.IDLE, h11.SEND_BODY)


class DeadlineH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with read deadlines on each request's head and body."""

    _deadline: asyncio.TimerHandle | None = None
    _reading: object = None  # the h11 state the deadline is for

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm(h11.IDLE)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._follow()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # an idle kept-alive connection: uvicorn's timeout
        self._follow()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _follow(self) -> None:
        """Arm the deadline of what the client is sending now, or disarm it once it is in."""
        state = self.conn.their_state
        if state not in _READING:
            self._disarm()  # the request is in (or the connection is over)
        elif state is h11.IDLE and not self.conn.trailing_data[0]:
            self._disarm()  # between requests: nothing sent yet (the keep-alive timeout)
        elif self._reading is not state:
            self._arm(state)

    def _arm(self, state: object) -> None:
        self._disarm()
        seconds = HEAD_SECONDS if state is h11.IDLE else BODY_SECONDS
        self._reading = state
        self._deadline = self.loop.call_later(seconds, self._expired)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._deadline, self._reading = None, None

    def _expired(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        if self.flow is not None and self.flow.read_paused:  # the server is not reading
            self._arm(self._reading)
            return
        what = "head" if self._reading is h11.IDLE else "body"
        logger.debug("closing a connection whose request %s was not sent in time", what)
        self.transport.close()
