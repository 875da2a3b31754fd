"""HTTP in, a small :class:`Outcome` out. The only module that imports httpx."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import weakref
from contextlib import suppress
from typing import Any, NamedTuple, Optional
from urllib.parse import urlsplit

import httpx

from ._retry import RETRY, RETRY_AFTER_STATUSES, classify, parse_retry_after
from ._version import __version__

log = logging.getLogger(__name__)

# Sent on every request: the CDN in front of the ingestion API refuses some library
# default user agents, which would look like a rejected key.
USER_AGENT = f"whisperr-durable-python/{__version__}"
# The status decides; the body is read only so that the connection can be reused, and
# only this much of it: a huge answer (a misrouted URL, a lying proxy) must not cost memory.
MAX_RESPONSE_BYTES = 64 * 1024


class Outcome(NamedTuple):
    """What one request came to: a class from :mod:`._retry` and what the server said."""

    kind: str
    status: Optional[int] = None
    retry_after: Optional[float] = None
    detail: str = ""


class Transport:
    """One pooled ``httpx.Client`` per process, made on first use and again after a fork."""

    def __init__(
        self, base_url: str, api_key: str, transport: Optional[httpx.BaseTransport] = None
    ) -> None:
        self._base_url = base_url
        self._headers = {
            "Content-Type": "application/json",
            "X-API-Key": api_key,
            "User-Agent": USER_AGENT,
        }
        self._transport = transport
        self._api_key = api_key
        self._client: Optional[httpx.Client] = None
        self._pid = 0
        # The sockets of this client's connections, so that abort() can cut them from
        # another thread: shutting a socket down wakes a read blocked on it at once.
        self._sockets: weakref.WeakSet[socket.socket] = weakref.WeakSet()
        self._sockets_lock = threading.Lock()
        self._extensions = {"trace": self._trace}

    def _http(self) -> httpx.Client:
        if self._client is None or self._pid != os.getpid():
            # A client inherited through fork shares sockets with the parent: never reuse it.
            # A plain-HTTP base URL never makes a TLS connection (redirects are not
            # followed): no certificates to load (tens of milliseconds, in a cron job).
            tls = urlsplit(self._base_url).scheme != "http"
            self._client = httpx.Client(
                transport=self._transport, headers=self._headers, verify=tls
            )
            self._pid = os.getpid()
            with self._sockets_lock:
                self._sockets = weakref.WeakSet()
        return self._client

    def _trace(self, event: str, info: dict[str, Any]) -> None:
        if event in ("connection.connect_tcp.complete", "connection.start_tls.complete"):
            stream = info.get("return_value")
            sock = stream.get_extra_info("socket") if stream is not None else None
            if isinstance(sock, socket.socket):
                with self._sockets_lock:
                    self._sockets.add(sock)

    def post(self, path: str, body: bytes, timeout: float) -> Outcome:
        try:
            with self._http().stream(
                "POST",
                self._base_url + path,
                content=body,
                timeout=timeout,
                extensions=self._extensions,
            ) as response:
                status = response.status_code
                retry_after = response.headers.get("Retry-After")
                _read_some(response)
        except Exception as exc:  # httpx's, or a custom transport's bug: never lose the batch
            # Error texts can quote headers: the key must not reach a log or on_error.
            detail = f"{type(exc).__name__}: {exc}".replace(self._api_key, "<api key>")
            log.debug("request failed: %s", detail)
            return Outcome(RETRY, detail=detail)
        return Outcome(
            classify(status),
            status=status,
            retry_after=(
                parse_retry_after(retry_after, time.time())
                if status in RETRY_AFTER_STATUSES
                else None
            ),
            detail=f"HTTP {status}",
        )

    def abort(self) -> None:
        """Cut every connection of the current client, from any thread: a request blocked on
        one of them fails at once (httpx's timeouts bound each read, not a whole request,
        so a server that trickles bytes would otherwise keep it open)."""
        with self._sockets_lock:
            sockets = list(self._sockets)
        for sock in sockets:
            with suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        client, self._client = self._client, None
        if client is not None and self._pid == os.getpid():
            client.close()


def _read_some(response: httpx.Response) -> None:
    """Read at most MAX_RESPONSE_BYTES of the body; leaving the rest unread closes the
    connection instead of reusing it."""
    read = 0
    for chunk in response.iter_bytes():
        read += len(chunk)
        if read >= MAX_RESPONSE_BYTES:
            return
