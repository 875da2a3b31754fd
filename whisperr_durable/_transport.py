"""HTTP in, a small :class:`Outcome` out. The only module that imports httpx."""

from __future__ import annotations

import logging
import os
import time
from typing import NamedTuple, Optional

import httpx

from ._retry import RETRY, classify, parse_retry_after
from ._version import __version__

log = logging.getLogger("whisperr_durable")

# Sent on every request: the CDN in front of the ingestion API refuses some library
# default user agents, which would look like a rejected key.
USER_AGENT = f"whisperr-durable-python/{__version__}"


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

    def _http(self) -> httpx.Client:
        if self._client is None or self._pid != os.getpid():
            # A client inherited through fork shares sockets with the parent: never reuse it.
            self._client = httpx.Client(transport=self._transport, headers=self._headers)
            self._pid = os.getpid()
        return self._client

    def post(self, path: str, body: bytes, timeout: float) -> Outcome:
        try:
            response = self._http().post(self._base_url + path, content=body, timeout=timeout)
        except Exception as exc:  # httpx's, or a custom transport's bug: never lose the batch
            # Error texts can quote headers: the key must not reach a log or on_error.
            detail = f"{type(exc).__name__}: {exc}".replace(self._api_key, "<api key>")
            log.debug("request failed: %s", detail)
            return Outcome(RETRY, detail=detail)
        status = response.status_code
        return Outcome(
            classify(status),
            status=status,
            retry_after=parse_retry_after(response.headers.get("Retry-After"), time.time()),
            detail=f"HTTP {status}",
        )

    def close(self) -> None:
        client, self._client = self._client, None
        if client is not None and self._pid == os.getpid():
            client.close()
