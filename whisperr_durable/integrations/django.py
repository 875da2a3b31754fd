"""Django integration: ``request.whisperr`` and a process-wide client built from settings.

A drop-in for the official ``whisperr.django``: change the dotted path and keep the
settings::

    WHISPERR_API_KEY = os.environ["WHISPERR_API_KEY"]
    WHISPERR_DB_PATH = "/var/lib/myapp/whisperr.db"  # a state directory (default ~/.whisperr.db)
    MIDDLEWARE = [
        # ... after your authentication middleware ...
        "whisperr_durable.integrations.django.WhisperrMiddleware",
    ]

Then in a view (sync or async)::

    request.whisperr.track("plan_upgraded", {"plan": "pro"})

Outside a request (signals, management commands, Celery tasks) use :func:`get_client` with
the user id from your data. The client is built from the ``WHISPERR_*`` settings on first
use (see :func:`~whisperr_durable.integrations.client_from_settings`).

``WHISPERR_DATABASE = "default"`` (an alias of ``DATABASES``, PostgreSQL on psycopg 3,
instead of ``WHISPERR_DB_PATH``) keeps the outbox in that database: inside its
``transaction.atomic()``, ``request.whisperr`` and ``get_client()`` calls join the
transaction, so an event exists if and only if the transaction commits.

The request's user is ``request.user.pk`` when ``request.user.is_authenticated``, or what
``WHISPERR_RESOLVE_USER`` (a callable taking the request, or its dotted path) returns. It is
looked up when the request comes in, as the official middleware does: a view may run in an
event loop (an async view) where a lazy ``request.user`` can no longer be loaded, so it is
loaded before. In the async path that is ``await request.auser()`` (Django 5+), and a
resolver runs in a thread (``sync_to_async``). Where no user is found then, it is looked up
again on each ``track()``/``identify()``, so a view can track right after ``login()``.

Inside an event loop that second look never touches the database: it reads ``request.user``
only once it is no longer an unloaded lazy object (``alogin()`` sets it to the user), and it
does not call a resolver (one only runs outside the loop). An async view that logs a user
in, with a resolver, sets the id itself::

    await alogin(request, user)
    request.whisperr.user_id = str(user.pk)  # or the id your resolver would give
"""

from __future__ import annotations

import asyncio
import functools
import logging
import sys
import threading
from typing import Any, Callable, Optional

from asgiref.sync import sync_to_async
from django.conf import settings
from django.core.signals import setting_changed
from django.utils.functional import LazyObject, empty

from .._client import DurableWhisperr, check_options
from ._common import (
    BoundWhisperr,
    ResolveUser,
    first_user_id,
    import_resolver,
    resolve_user_id,
    resolver_user_id,
    settings_options,
)

try:
    from asgiref.sync import iscoroutinefunction, markcoroutinefunction
except ImportError:  # asgiref < 3.6 (Django < 4.2)
    iscoroutinefunction = asyncio.iscoroutinefunction  # type: ignore[assignment]

    def markcoroutinefunction(func: Any) -> Any:
        func._is_coroutine = asyncio.coroutines._is_coroutine  # type: ignore[attr-defined]
        return func


__all__ = ["WhisperrMiddleware", "get_client"]

log = logging.getLogger(__name__)

_client: Optional[DurableWhisperr] = None
_client_lock = threading.Lock()


def get_client() -> DurableWhisperr:
    """The process-wide client, built from Django's settings on first use (thread-safe)."""
    global _client
    if not _official_noticed.is_set() and "whisperr.django" in sys.modules:
        _notice_the_official_sdk()
    client = _client
    if client is None:
        with _client_lock:
            if _client is None:
                _client = _client_from_settings()
            client = _client
    return client


def _client_from_settings() -> DurableWhisperr:
    api_key, options, alias = _options()
    if alias is None:
        return DurableWhisperr(api_key, **options)
    return _TransactionalClient(alias, api_key, **options)


def check_settings() -> None:
    """``ValueError`` for ``WHISPERR_*`` settings a client could not work with."""
    _options()


def _options() -> tuple[Any, dict[str, Any], Optional[str]]:
    """The key, the options and the database alias (``WHISPERR_DATABASE``) of the client
    the settings describe; ``ValueError`` for settings that cannot work."""
    api_key, options = settings_options(settings)
    alias = getattr(settings, "WHISPERR_DATABASE", None)
    if alias is not None:
        if getattr(settings, "WHISPERR_DB_PATH", None) is not None:
            raise ValueError("set WHISPERR_DATABASE or WHISPERR_DB_PATH, not both")
        options["path"] = database_url(alias)
    check_options(api_key, **options)
    return api_key, options, alias


# libpq's connection keywords that Django's OPTIONS may carry and a URL can pass on.
_LIBPQ_OPTIONS = (
    "sslmode",
    "sslrootcert",
    "sslcert",
    "sslkey",
    "sslpassword",
    "connect_timeout",
    "target_session_attrs",
    "options",
    "service",
    "passfile",
)


def database_url(alias: str) -> str:
    """The ``postgresql://`` URL of one of Django's databases (``DATABASES[alias]``)."""
    from urllib.parse import quote, urlencode

    databases = getattr(settings, "DATABASES", {})
    if alias not in databases:
        raise ValueError(f"WHISPERR_DATABASE: no database {alias!r} in DATABASES")
    db = databases[alias]
    if "postgresql" not in str(db.get("ENGINE", "")):
        raise ValueError(
            f"WHISPERR_DATABASE: database {alias!r} is not PostgreSQL ({db.get('ENGINE')})"
        )
    user = quote(str(db.get("USER") or ""), safe="")
    password = quote(str(db.get("PASSWORD") or ""), safe="")
    userinfo = f"{user}{':' + password if password else ''}@" if user else ""
    host = str(db.get("HOST") or "")
    port = f":{db['PORT']}" if db.get("PORT") else ""
    extra = {k: v for k, v in (db.get("OPTIONS") or {}).items() if k in _LIBPQ_OPTIONS}
    query = f"?{urlencode(extra)}" if extra else ""
    return f"postgresql://{userinfo}{host}{port}/{quote(str(db.get('NAME') or ''), safe='')}{query}"


class _TransactionalClient(DurableWhisperr):
    """The client of a project whose outbox is one of its own databases
    (``WHISPERR_DATABASE``): inside that database's ``transaction.atomic()``, ``track()`` and
    ``identify()`` join the transaction, so the op exists if and only if it commits; the
    sender is woken by the commit. Outside one, they store the op at once, as always."""

    def __init__(self, alias: str, api_key: Any, **options: Any) -> None:
        super().__init__(api_key, **options)
        self.database_alias = alias

    def track(
        self,
        external_user_id: str,
        event_type: str,
        properties: Optional[Any] = None,
        context: Optional[Any] = None,
        *,
        connection: Any = None,
    ) -> None:
        super().track(
            external_user_id,
            event_type,
            properties,
            context,
            connection=connection if connection is not None else self._in_atomic_block(),
        )

    def identify(self, external_user_id: str, **kwargs: Any) -> None:
        if kwargs.get("connection") is None:
            kwargs["connection"] = self._in_atomic_block()
        super().identify(external_user_id, **kwargs)

    def _in_atomic_block(self) -> Any:
        """The psycopg connection of the alias's open ``atomic()`` block, if any."""
        from django.db import connections, transaction

        wrapper = connections[self.database_alias]
        if not wrapper.in_atomic_block or _in_event_loop():
            return None
        transaction.on_commit(self._sender.wake, using=self.database_alias)
        return wrapper.connection


_official_noticed = threading.Event()


def _notice_the_official_sdk() -> None:
    """Say once that the official SDK's Django module is loaded too: code that still imports
    its ``get_client`` sends through the official client, whose queue is in memory."""
    _official_noticed.set()
    log.warning(
        "whisperr.django (the official SDK) is imported in this process too: code that calls "
        "its get_client() sends through the official client, whose queue lives in memory. "
        "Import get_client from whisperr_durable.integrations.django everywhere (signals, "
        "management commands, tasks), not only in MIDDLEWARE"
    )


def _reset_client() -> None:
    """Shut down and forget the process-wide client: the next :func:`get_client` reads the
    settings again. Runs by itself when a test changes a ``WHISPERR_*`` setting
    (``override_settings``); what the old client had not delivered stays in its outbox."""
    global _client
    with _client_lock:
        client, _client = _client, None
    if client is not None:
        client.shutdown()


def asgi_application(application: Optional[Any] = None) -> Any:
    """Django's ASGI application (``get_asgi_application()`` unless given), answering the
    ASGI lifespan itself, which Django does not: at ``lifespan.shutdown`` it flushes the
    process-wide client (if one was made) within its shutdown_timeout. Servers that end with
    SIGTERM after a graceful shutdown (uvicorn) run no exit handler; this is where the last
    ops get delivered. In ``asgi.py``::

        from whisperr_durable.integrations.django import asgi_application
        application = asgi_application()
    """
    if application is None:
        from django.core.asgi import get_asgi_application

        application = get_asgi_application()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "lifespan":
            await application(scope, receive, send)
            return
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                client = _client
                if client is not None:
                    await client.aflush(client.shutdown_timeout)
                await send({"type": "lifespan.shutdown.complete"})
                return

    return app


def _on_setting_changed(*, setting: str, **kwargs: Any) -> None:
    if setting.startswith("WHISPERR_"):
        _reset_client()


setting_changed.connect(_on_setting_changed, dispatch_uid="whisperr_durable.django")


def user_id_of(user: Any) -> Optional[str]:
    """The id of a Django user: ``str(user.pk)`` when ``user.is_authenticated``, else ``None``.

    ``pk`` is the primary key whatever its field is named (a custom user model's ``uuid``);
    a user object that has no ``pk`` goes through ``resolve_user_id`` (``id``, ``sub``, ...).
    """
    if user is None or not getattr(user, "is_authenticated", False):
        return None
    pk = getattr(user, "pk", None)
    return resolve_user_id(user if pk is None else str(pk))


def _default_resolve_user(request: Any) -> Optional[str]:
    return _guarded_user_id(getattr(request, "user", None))


def _guarded_user_id(user: Any) -> Optional[str]:
    """``user_id_of(user)``; a user whose ``pk`` (or ``is_authenticated``) raises is no user,
    logged at DEBUG: the request goes on."""
    return first_user_id(lambda: user, read=user_id_of)


def _in_event_loop() -> bool:
    """Whether this thread runs an event loop (where Django refuses database queries)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _user_id_again(request: Any, resolve: ResolveUser) -> Optional[str]:
    """A second look for the user of a request that had none when it came in (it may have
    logged in since). Inside an event loop, where Django refuses database queries, only a
    ``request.user`` that ``alogin()`` replaced is read, and a resolver is never called."""
    if not _in_event_loop():
        return resolver_user_id(resolve, request)
    if resolve is _default_resolve_user:
        user = getattr(request, "user", None)
        if not (isinstance(user, LazyObject) and user._wrapped is empty):
            return _guarded_user_id(user)
    return None


class WhisperrMiddleware:
    """Attaches ``request.whisperr`` bound to the request's user; sync and async capable.

    ``WHISPERR_RESOLVE_USER`` (read when Django builds the middleware) replaces the default
    ``request.user.pk``; a resolver that raises binds no user.
    """

    sync_capable = True
    async_capable = True

    def __init__(self, get_response: Callable[[Any], Any]) -> None:
        self.get_response = get_response
        self.async_mode = iscoroutinefunction(get_response)
        if self.async_mode:
            markcoroutinefunction(self)
        self.resolve_user: Optional[ResolveUser] = import_resolver(
            getattr(settings, "WHISPERR_RESOLVE_USER", None)
        )
        # A settings mistake shows at startup, not on the first request; the client itself
        # is made on first use: under gunicorn --preload this runs in the master, which
        # must not own a sending client (its exit flush would come after the workers').
        check_settings()

    @property
    def client(self) -> DurableWhisperr:
        return get_client()

    def __call__(self, request: Any) -> Any:
        if self.async_mode:
            return self.__acall__(request)
        resolve = self.resolve_user or _default_resolve_user
        request.whisperr = self._bound(request, resolve, resolver_user_id(resolve, request))
        return self.get_response(request)

    async def __acall__(self, request: Any) -> Any:
        resolve = self.resolve_user or _default_resolve_user
        found = await self._auser_id(resolve, request)
        request.whisperr = self._bound(request, resolve, found)
        return await self.get_response(request)

    @staticmethod
    def _bound(request: Any, resolve: ResolveUser, found: Optional[str]) -> BoundWhisperr:
        return BoundWhisperr(
            get_client(), found, lookup=functools.partial(_user_id_again, request, resolve)
        )

    async def _auser_id(self, resolve: ResolveUser, request: Any) -> Optional[str]:
        user = getattr(request, "user", None)
        if resolve is _default_resolve_user and not isinstance(user, LazyObject):
            return _guarded_user_id(user)  # set already: nothing to load
        auser = getattr(request, "auser", None)
        if resolve is _default_resolve_user and auser is not None:
            try:
                user = await auser()
            except Exception:
                log.debug("request.auser() raised; no user bound", exc_info=True)
                return None
            return _guarded_user_id(user)
        # A resolver (or a lazy user without auser()) may touch the database: not in the loop.
        return await sync_to_async(resolver_user_id)(resolve, request)
