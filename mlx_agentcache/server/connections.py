"""Limits that hold without an API key: how many connections are open, how long
a client may take to send a request's headers, how much the log may grow.

uvicorn answers `limit_concurrency` with a 503 only once a request's headers
are complete, and has no timeout for headers that never complete: about two
thousand idle connections with half-sent headers exhaust the process's file
descriptors, and then saves fail too. So each connection beyond
`max_connections` gets a 503 at once and is closed, and a connection that
has not sent a complete request head within `header_timeout` seconds (after
it opened, or after its last response) is closed. Repeated log lines (an
accept error, an invalid request) are written at most once per
`LOG_EVERY_S` seconds each, with a count of the ones left out.
"""

from __future__ import annotations

import logging
import resource
import time

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

LOG_EVERY_S = 10.0
FILES_RESERVED = 128  # descriptors kept for cache files, locks and the model
_BUSY = b"too many open connections; retry in a second\n"
REFUSAL = (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain; charset=utf-8\r\nretry-after: 1\r\n"
           b"connection: close\r\ncontent-length: %d\r\n\r\n%s") % (len(_BUSY), _BUSY)


def guarded_protocol(max_connections: int, header_timeout: float, metrics) -> type:
    """An h11 protocol class for uvicorn (`http=`) with the bounds above."""

    class Guarded(H11Protocol):
        _header_timer = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                metrics.connections_refused += 1
                transport.write(REFUSAL)
                transport.close()
                return
            self._arm()

        def _arm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
            self._header_timer = self.loop.call_later(header_timeout, self._header_deadline)

        def _header_deadline(self) -> None:
            self._header_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():  # no complete request head
                metrics.connections_timed_out += 1
                self.transport.close()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()

        def connection_lost(self, exc) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
            super().connection_lost(exc)

    return Guarded


def connection_bound(wanted: int) -> int:
    """Raise the soft open-files limit as far as allowed; the connection bound that leaves room for files."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 16)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        soft = want
    except (ValueError, OSError):
        pass
    return max(1, min(wanted, soft - FILES_RESERVED))


class Repeats(logging.Filter):
    """Lets each message template through at most once per `every` seconds; the next
    one that passes says how many were left out."""

    def __init__(self, every: float = LOG_EVERY_S):
        super().__init__()
        self.every = every
        self.last: dict[str, tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        key = f"{record.name}:{record.msg}"
        now = time.monotonic()
        last, skipped = self.last.get(key, (-self.every, 0))
        if now - last < self.every:
            self.last[key] = (last, skipped + 1)
            return False
        if len(self.last) > 1000:
            self.last.clear()
        self.last[key] = (now, 0)
        if skipped:
            record.msg = f"{record.msg} ({skipped} more like it in the last {self.every:g} s)"
        return True


def quiet_repeats() -> None:
    """Bound the log: uvicorn's and asyncio's repeated warnings and errors."""
    for name in ("uvicorn.error", "asyncio"):
        logging.getLogger(name).addFilter(Repeats())
