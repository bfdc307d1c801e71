"""What a hostile or broken HTTP client can hold: connections, time to send a request, bad text.

- Connections: uvicorn accepts every connection and keeps it until the client closes it, so
  idle half-open sockets could use up the process's file descriptors (then nothing, not even
  /health, is answered). At most `max_connections()` (well below RLIMIT_NOFILE) are kept: a
  new one beyond that replaces the oldest connection that has no request in progress, or is
  closed at once if every connection is busy.
- Read timeout: uvicorn has no timer for a request that arrives slowly (slowloris) or never;
  a request's headers and body must arrive within REQUEST_READ_SECONDS of the connection
  opening (or of the previous response), else the connection is closed.
- Text: JSON may carry lone surrogates ("\\ud800"), which no tokenizer can encode; they are
  refused with a 400 (llama-server refuses invalid UTF-8 the same way).
"""
from __future__ import annotations

import asyncio
import json
import resource
import time

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

REQUEST_READ_SECONDS = 30.0
FD_RESERVE = 64  # descriptors kept for the model, logs, the event loop and the thread pool
MAX_CONNECTIONS = 1000


def max_connections() -> int:
    """Concurrent connections the server keeps: below the soft descriptor limit."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return MAX_CONNECTIONS
    return max(4, min(MAX_CONNECTIONS, soft - FD_RESERVE))


def bounded_protocol(limit: int | None = None, read_seconds: float | None = None):
    """uvicorn's h11 protocol with a connection limit and a request read timeout."""
    limit = limit or max_connections()
    read_seconds = read_seconds or REQUEST_READ_SECONDS

    class BoundedH11Protocol(H11Protocol):
        def connection_made(self, transport: asyncio.Transport) -> None:
            if len(self.connections) >= limit and not _evict_idle(self.connections):
                self.transport = transport
                transport.abort()  # refused before it costs anything more than its descriptor
                return
            self._opened = time.monotonic()
            super().connection_made(transport)
            self._read_timer = None
            self._arm_read_timer()

        def is_idle(self) -> bool:
            """No request in progress: waiting for (the rest of) a request's headers."""
            busy = self.cycle is not None and not self.cycle.response_complete
            return not busy and self.conn.their_state in (h11.IDLE, h11.DONE) and not self.transport.is_closing()

        def _arm_read_timer(self) -> None:
            if getattr(self, "_read_timer", None) is not None:
                self._read_timer.cancel()
            self._read_timer = self.loop.call_later(read_seconds, self._read_timeout)

        def _read_timeout(self) -> None:
            self._read_timer = None
            # IDLE: headers not (fully) arrived; SEND_BODY: the body is still coming.
            if self.conn.their_state in (h11.IDLE, h11.SEND_BODY) and not self.transport.is_closing():
                self.transport.close()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm_read_timer()

        def connection_lost(self, exc) -> None:
            timer = getattr(self, "_read_timer", None)
            if timer is not None:
                timer.cancel()
            if self.flow is None:  # refused in connection_made: nothing was set up
                return
            super().connection_lost(exc)

    return BoundedH11Protocol


def _evict_idle(connections) -> bool:
    """Close the oldest connection with no request in progress; False if there is none."""
    idle = [c for c in connections if getattr(c, "is_idle", None) and c.is_idle()]
    if not idle:
        return False
    oldest = min(idle, key=lambda c: c._opened)
    connections.discard(oldest)
    oldest.transport.abort()
    return True


class UnencodableText(ValueError):
    pass


def check_encodable(value) -> None:
    """UnencodableText if any string in a parsed JSON value holds a lone surrogate."""
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise UnencodableText("the request holds text that is not valid Unicode (a lone surrogate "
                              "such as \\ud800)") from None
