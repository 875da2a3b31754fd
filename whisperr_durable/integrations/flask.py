"""Flask integration: an extension that puts ``request.whisperr`` on every request.

::

    from whisperr_durable.integrations.flask import Whisperr

    app.config["WHISPERR_API_KEY"] = os.environ["WHISPERR_API_KEY"]
    whisperr = Whisperr(app)            # or Whisperr() and whisperr.init_app(app) in a factory

    @app.post("/upgrade")
    def upgrade():
        request.whisperr.track("plan_upgraded", {"plan": "pro"})

The client is built from ``app.config`` (the ``WHISPERR_*`` names of the Django settings)
unless one is passed as ``client=``; each app keeps its own in
``app.extensions["whisperr_durable"]``. Outside a request (CLI commands, jobs run in an app
context) use :func:`current_client` or ``whisperr.client`` with the user id from your data.

The request's user is found on first use of ``request.whisperr``, not on every request:
``resolve_user(request)`` when given (or ``WHISPERR_RESOLVE_USER``, a dotted path), else
the first of Flask-Login's ``current_user`` (where the app has a login manager; its ``id``,
else ``get_id()``), ``g.user``, ``request.user``, ``g.auth``, ``request.auth`` (an auth
object or claims with ``user_id``, ``userId``, ``id`` or ``sub``) that has an id. A lookup
that raises (a ``user_loader`` whose database is down) counts as no user, logged at DEBUG:
the request goes on. Where there is no user, ``track()`` and ``identify()`` do nothing;
``request.whisperr.user_id = "u_123"`` binds one outright (after a sign-up, say).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

from flask import Flask, current_app, g, has_app_context, has_request_context, request

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

__all__ = ["EXTENSION_KEY", "Whisperr", "WhisperrState", "current_client"]

log = logging.getLogger(__name__)

EXTENSION_KEY = "whisperr_durable"


@dataclass(frozen=True)
class WhisperrState:
    """What :meth:`Whisperr.init_app` keeps in ``app.extensions["whisperr_durable"]``."""

    client: DurableWhisperr
    resolve_user: Optional[ResolveUser]

    def user_id(self, req: Any) -> Optional[str]:
        """The id of the user of ``req``; needs its request context for the default lookups
        (a ``resolve_user`` is only given ``req``)."""
        if self.resolve_user is not None:
            return resolver_user_id(self.resolve_user, req)
        if not has_request_context():
            log.warning(
                "request.whisperr first used outside its request; "
                "no user bound (use it in the view, or copy_current_request_context)"
            )
            return None
        return _default_user_id(req)


def _default_user_id(req: Any) -> Optional[str]:
    """The id of the first default candidate of ``req`` that has one (in its request
    context); a candidate is only looked at if those before it have none."""
    return first_user_id(*(functools.partial(lookup, req) for lookup in _DEFAULT_LOOKUPS))


def _login_user_id(req: Any) -> Optional[str]:
    """Flask-Login's current user's id (else its ``get_id()``), where the app has a login
    manager; this loads the user (the app's ``user_loader``)."""
    if not hasattr(current_app, "login_manager"):
        return None
    from flask_login import current_user  # installed: the app has a login manager

    user = current_user._get_current_object()
    if not getattr(user, "is_authenticated", False):
        return None
    user_id = resolve_user_id(user)
    if user_id is None and callable(getattr(user, "get_id", None)):
        user_id = resolve_user_id(user.get_id())
    return user_id


# Where the default lookup finds the user, in order.
_DEFAULT_LOOKUPS: tuple[Callable[[Any], Any], ...] = (
    _login_user_id,
    lambda req: g.get("user"),
    lambda req: getattr(req, "user", None),
    lambda req: g.get("auth"),
    lambda req: getattr(req, "auth", None),
)


class Whisperr:
    """The Flask extension: ``Whisperr(app)``, or ``Whisperr()`` then ``init_app(app)``.

    ``client`` is used by every app this extension is initialised on; without it, each app
    gets a client built from its ``app.config``. ``resolve_user(request)`` returns the
    request's user id (or a user object, or ``None``) and wins over
    ``WHISPERR_RESOLVE_USER``.
    """

    def __init__(
        self,
        app: Optional[Flask] = None,
        *,
        client: Optional[DurableWhisperr] = None,
        resolve_user: Union[str, ResolveUser, None] = None,
    ) -> None:
        self._client = client
        self._resolve_user = resolve_user
        self._app = app
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        """Give ``app`` its client and put ``request.whisperr`` on each of its requests."""
        if EXTENSION_KEY in app.extensions:
            raise RuntimeError(f"whisperr_durable is already initialised on app {app.name!r}")
        resolver = self._resolve_user
        if resolver is None:
            resolver = app.config.get("WHISPERR_RESOLVE_USER")
        state = WhisperrState(
            client=self._client if self._client is not None else client_from_settings(app.config),
            resolve_user=import_resolver(resolver),
        )
        app.extensions[EXTENSION_KEY] = state

        def attach_whisperr() -> None:
            req = request._get_current_object()  # type: ignore[attr-defined]
            request.whisperr = BoundWhisperr(  # type: ignore[attr-defined]
                state.client, lookup=functools.partial(state.user_id, req)
            )

        # First, so that the app's own before_request hooks can use it too.
        app.before_request_funcs.setdefault(None, []).insert(0, attach_whisperr)

    @property
    def client(self) -> DurableWhisperr:
        """The current app's client; outside an app context, that of the app given to the
        constructor, or the ``client`` given to it."""
        if has_app_context():
            state = current_app.extensions.get(EXTENSION_KEY)
            if state is not None:
                return state.client  # type: ignore[no-any-return]
        if self._app is not None:
            return self._app.extensions[EXTENSION_KEY].client  # type: ignore[no-any-return]
        if self._client is not None:
            return self._client
        raise RuntimeError(
            "no Whisperr client here: use it in an app context (with app.app_context():)"
        )


def current_client() -> DurableWhisperr:
    """The client of the current Flask app, for code outside a request: CLI commands,
    jobs run in ``with app.app_context():``. Raises ``RuntimeError`` without an app
    context or where the app has no :class:`Whisperr`."""
    if not has_app_context():
        raise RuntimeError("current_client() needs an app context (with app.app_context():)")
    state = current_app.extensions.get(EXTENSION_KEY)
    if state is None:
        raise RuntimeError(f"Whisperr is not initialised on app {current_app.name!r}")
    return state.client  # type: ignore[no-any-return]
