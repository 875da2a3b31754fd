"""Starlette and FastAPI: ``request.state.whisperr`` bound to the request's user.

As middleware (Starlette or FastAPI)::

    app.add_middleware(WhisperrMiddleware)

    async def endpoint(request):
        request.state.whisperr.track("plan_upgraded", {"plan": "pro"})

As a FastAPI dependency (no middleware needed)::

    whisperr = whisperr_dependency()

    @app.post("/upgrade")
    def upgrade(w: BoundWhisperr = Depends(whisperr)):
        w.track("plan_upgraded", {"plan": "pro"})

Both take ``client=`` (a ``DurableWhisperr``); without it they use :func:`get_client`, one
process-wide client built on first use from the ``WHISPERR_*`` environment variables
(``WHISPERR_API_KEY``, ``WHISPERR_DB_PATH``, ``WHISPERR_BASE_URL``, ...; see
:func:`~whisperr_durable.integrations.client_from_settings`). Outside a request (background
tasks, workers in the same process) use ``get_client()`` with the user id from your data.

The user is looked up when ``track()`` or ``identify()`` is first called, not when the
request comes in, so a user that authentication middleware or a dependency sets later in
the request is found. By default it is the first of ``scope["user"]`` (``request.user``,
set by Starlette's ``AuthenticationMiddleware``), ``request.state.user`` and
``request.state.auth`` (an auth object or claims with ``user_id``, ``userId``, ``id`` or
``sub``) that has an id; a lookup that raises counts as no user (logged at DEBUG).
``resolve_user`` (a callable taking the request, or its dotted path) replaces these. No
user, no event; ``request.state.whisperr.user_id = "u_123"`` binds one outright.

Only Starlette is imported here; FastAPI is not needed to use either helper.
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Awaitable, MutableMapping
from typing import Any, Callable, Optional, Union

from starlette.authentication import BaseUser
from starlette.requests import HTTPConnection, Request
from starlette.types import ASGIApp, Receive, Scope, Send

from .._client import DurableWhisperr
from ._common import (
    BoundWhisperr,
    ResolveUser,
    client_from_settings,
    first_user_id,
    import_resolver,
    resolve_user_id,
    resolver_user_id,
)

__all__ = ["BoundWhisperr", "WhisperrMiddleware", "get_client", "whisperr_dependency"]

_client: Optional[DurableWhisperr] = None
_client_lock = threading.Lock()


def get_client() -> DurableWhisperr:
    """The process-wide client, built from the ``WHISPERR_*`` environment variables on
    first use (thread-safe): what the middleware and the dependency use without ``client``."""
    global _client
    client = _client
    if client is None:
        with _client_lock:
            if _client is None:
                _client = client_from_settings(os.environ)
            client = _client
    return client


def _reset_client() -> None:
    """Shut down and forget the process-wide client: the next :func:`get_client` reads the
    environment again. What the old client had not delivered stays in its outbox."""
    global _client
    with _client_lock:
        client, _client = _client, None
    if client is not None:
        client.shutdown()


def default_user_id(user: Any) -> Optional[str]:
    """``resolve_user_id(user)``, then, for a Starlette user, its ``identity``.

    Starlette's own ``SimpleUser`` carries nothing but a username, which is its
    ``identity``: without this it could never be tracked. A custom ``BaseUser`` that has an
    ``id`` (or ``pk``, ``sub``, ...) is tracked by that; one that implements ``identity``
    and no id field, by its identity. ``display_name`` is never used: it is for display, and
    need not be unique.
    """
    user_id = resolve_user_id(user)
    if user_id is None and isinstance(user, BaseUser) and user.is_authenticated:
        try:
            user_id = resolve_user_id(user.identity)
        except NotImplementedError:
            return None
    return user_id


def scope_user_id(
    scope: Scope, resolve: Optional[ResolveUser] = None, connection: Optional[HTTPConnection] = None
) -> Optional[str]:
    """The id of the request's user: what ``resolve`` names, else the first of
    ``scope["user"]``, ``request.state.user`` and ``request.state.auth`` that has one (one
    whose id raises counts as no user, logged at DEBUG)."""
    if resolve is not None:
        if connection is None:
            # A sync resolver only reads the request, so no receive channel is needed.
            connection = Request(scope) if scope["type"] == "http" else HTTPConnection(scope)
        return resolver_user_id(resolve, connection)
    state = scope.get("state")
    if not isinstance(state, dict):
        state = {}
    # Not scope["auth"]: Starlette's AuthCredentials there holds scopes, not a user.
    return first_user_id(
        lambda: scope.get("user"),
        lambda: state.get("user"),
        lambda: state.get("auth"),
        read=default_user_id,
    )


def _bound(
    client: DurableWhisperr,
    scope: Scope,
    resolve: Optional[ResolveUser],
    connection: Optional[HTTPConnection] = None,
) -> BoundWhisperr:
    # Looked up on first use: a user that authentication sets later in the request counts.
    lookup = functools.partial(scope_user_id, scope, resolve, connection)
    return BoundWhisperr(client, lookup=lookup)


class WhisperrMiddleware:
    """Pure ASGI middleware that sets ``request.state.whisperr`` (and ``websocket.state``).

    ``app.add_middleware(WhisperrMiddleware)``, in Starlette or FastAPI, or
    ``Middleware(WhisperrMiddleware)`` in ``Starlette(middleware=[...])``; ``client=`` to
    use a client of your own rather than :func:`get_client` (fetched on the first request).
    Its place relative to authentication middleware does not matter: the user is looked up
    when the endpoint first calls ``track()``. Other scopes (lifespan) pass through.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        client: Optional[DurableWhisperr] = None,
        resolve_user: Union[str, ResolveUser, None] = None,
    ) -> None:
        self.app = app
        self._client = client
        self.resolve_user = import_resolver(resolve_user)

    @property
    def client(self) -> DurableWhisperr:
        """The client given, else the process-wide one."""
        return self._client if self._client is not None else get_client()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            state: MutableMapping[str, Any] = scope.setdefault("state", {})
            state["whisperr"] = _bound(self.client, scope, self.resolve_user)
        elif scope["type"] == "lifespan":
            send = flush_at_shutdown(send, lambda: self._client or _client)
        await self.app(scope, receive, send)


def flush_at_shutdown(send: Send, client: Callable[[], Optional[DurableWhisperr]]) -> Send:
    """Wrap a lifespan scope's ``send``: before the app's ``lifespan.shutdown.complete``
    goes to the server, flush ``client()`` (if one was made) within its shutdown_timeout.

    Servers that end with SIGTERM (uvicorn re-raises it after its graceful shutdown) run no
    exit handler: this is where the last ops get delivered rather than left on disk.
    """

    async def sending(message: MutableMapping[str, Any]) -> None:
        if message.get("type") == "lifespan.shutdown.complete":
            used = client()
            if used is not None:
                await used.aflush(used.shutdown_timeout)
        await send(message)

    return sending


def whisperr_dependency(
    client: Optional[DurableWhisperr] = None,
    resolve_user: Union[str, ResolveUser, None] = None,
) -> Callable[[HTTPConnection], Awaitable[BoundWhisperr]]:
    """A FastAPI dependency giving the request's ``BoundWhisperr``; no middleware needed.

    ``Depends(whisperr_dependency())`` works in HTTP and WebSocket routes, sync or async.
    Without ``client`` it uses :func:`get_client`. The user is found as by
    ``WhisperrMiddleware``; ``resolve_user`` gets the request.
    """
    resolve = import_resolver(resolve_user)

    async def whisperr(connection: HTTPConnection) -> BoundWhisperr:
        used = client if client is not None else get_client()
        return _bound(used, connection.scope, resolve, connection)

    return whisperr
