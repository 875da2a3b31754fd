"""What every integration shares: the request-bound helper, user resolution, settings."""

from __future__ import annotations

import inspect
import logging
import threading
import uuid
from collections.abc import Mapping
from importlib import import_module
from typing import Any, Callable, Optional, Union

from .._client import DurableWhisperr, check_options
from .._options import SETTINGS, from_text

log = logging.getLogger(__name__)

ResolveUser = Callable[[Any], Optional[str]]

# Where a user object keeps its id, in the order they are tried (as the Node SDK does).
_ID_FIELDS = ("id", "pk", "sub", "user_id", "userId")

# The options, by the setting that sets each (one table, in _options, for the client, the
# command line and the integrations), and on_error, which a setting gives as a dotted path.
_OPTIONS = {name: option for option, (name, _) in SETTINGS.items()}
_OPTIONS["WHISPERR_ON_ERROR"] = "on_error"


def client_from_settings(settings: Union[Mapping[str, Any], Any]) -> DurableWhisperr:
    """A client configured from ``WHISPERR_*`` settings: a mapping (Flask's ``app.config``)
    or an object with attributes (Django's ``settings``). Unset names keep the defaults.

    ``WHISPERR_API_KEY`` (else the ``WHISPERR_API_KEY`` environment variable), and
    ``WHISPERR_BASE_URL``, ``WHISPERR_DISABLED``, ``WHISPERR_DEBUG``, ``WHISPERR_APP_VERSION``
    as in the official SDK; ``WHISPERR_DB_PATH`` and ``WHISPERR_<OPTION>`` for the durable
    options (``WHISPERR_FLUSH_AT``, ``WHISPERR_MAX_QUEUE_SIZE``, ``WHISPERR_FSYNC``,
    ``WHISPERR_STRICT``, ...). ``WHISPERR_ON_ERROR`` is a callable or its dotted path.
    ``ValueError`` for a setting that cannot work, or an outbox path this process cannot
    make or write (naming the path, this process's user and the owner).
    """
    api_key, options = settings_options(settings)
    check_options(api_key, **options)  # an outbox path this process cannot write: say so now
    return DurableWhisperr(api_key, **options)


def check_settings(settings: Union[Mapping[str, Any], Any]) -> None:
    """``ValueError`` now for settings a client could not work with, without making one: a
    server's master process (``gunicorn --preload``) must not own a sending client."""
    api_key, options = settings_options(settings)
    check_options(api_key, **options)


def settings_options(settings: Union[Mapping[str, Any], Any]) -> tuple[Any, dict[str, Any]]:
    """The key and the client's options that ``WHISPERR_*`` settings give."""
    get = settings.get if isinstance(settings, Mapping) else _attribute_getter(settings)
    options: dict[str, Any] = {}
    for name, option in _OPTIONS.items():
        value = get(name, None)
        if value is not None:
            options[option] = _from_text(name, option, value) if isinstance(value, str) else value
    if isinstance(options.get("on_error"), str):
        options["on_error"] = _import_callable(options["on_error"], "WHISPERR_ON_ERROR")
    return get("WHISPERR_API_KEY", None), options


def _from_text(name: str, option: str, text: str) -> Any:
    """A setting given as text (an environment variable, say) as the option's type."""
    return text if option == "on_error" else from_text(option, text, name)


def _attribute_getter(settings: Any) -> Callable[[str, Any], Any]:
    return lambda name, default: getattr(settings, name, default)


def resolve_user_id(user: Any) -> Optional[str]:
    """The id of a user object or mapping, or ``None`` for no user (or an anonymous one).

    Tries ``id``, ``pk``, ``sub``, ``user_id``, ``userId`` as attributes or keys; an object
    whose ``is_authenticated`` is false (Django's, Flask-Login's and Starlette's anonymous
    users) has none. A string, an int or a UUID is taken as the id itself.
    """
    if user is None or isinstance(user, bool):
        return None
    if isinstance(user, (str, int, uuid.UUID)):
        text = str(user).strip()
        return text or None
    if getattr(user, "is_authenticated", True) is False:
        return None
    for field in _ID_FIELDS:
        value = user.get(field) if isinstance(user, Mapping) else getattr(user, field, None)
        if value is not None and not isinstance(value, bool) and str(value).strip():
            return str(value).strip()
    return None


def import_resolver(resolver: Union[str, ResolveUser, None]) -> Optional[ResolveUser]:
    """A ``resolve_user`` callable from itself or its dotted path (``"app.auth.whisperr_id"``).

    It must be a plain function (it is called where the request is at hand, sync): an
    ``async def`` one raises ``TypeError`` here rather than bind no user later.
    """
    if resolver is None:
        return None
    resolved = _import_callable(resolver, "resolve_user") if isinstance(resolver, str) else resolver
    if inspect.iscoroutinefunction(resolved) or inspect.iscoroutinefunction(
        getattr(resolved, "__call__", None)  # noqa: B004
    ):
        raise TypeError(f"resolve_user must be a plain (not async) function: {resolver!r}")
    return resolved


def _import_callable(dotted: str, what: str) -> Callable[..., Any]:
    module_path, _, attr = dotted.rpartition(".")
    if not module_path:
        raise ValueError(f"{what} must be a callable or a dotted path, not {dotted!r}")
    resolved = getattr(import_module(module_path), attr)
    if not callable(resolved):
        raise ValueError(f"{dotted} is not callable")
    return resolved  # type: ignore[no-any-return]


class BoundWhisperr:
    """``track()`` and ``identify()`` for one request's user (``request.whisperr``).

    With ``lookup``, the user is looked up on first use, and again on each call while none
    is found (so a view can track right after its login); a user found is kept for the rest
    of the request. Setting ``user_id`` (an id, or a user object) binds that user outright;
    setting ``None`` looks again. Without a user, both calls do nothing: the first time in
    the process at WARNING (an auth dependency that returns its user instead of setting
    ``request.state.user`` looks just like this), then at DEBUG.
    """

    __slots__ = ("_lookup", "_user_id", "client")

    def __init__(
        self,
        client: DurableWhisperr,
        user_id: Optional[str] = None,
        *,
        lookup: Optional[Callable[[], Optional[str]]] = None,
    ) -> None:
        self.client = client
        self._user_id = user_id
        self._lookup = lookup

    @property
    def user_id(self) -> Optional[str]:
        if self._user_id is None and self._lookup is not None:
            self._user_id = self._lookup()
        return self._user_id

    @user_id.setter
    def user_id(self, value: Any) -> None:
        self._user_id = resolve_user_id(value)

    def track(
        self,
        event_type: str,
        properties: Optional[Mapping[str, Any]] = None,
        context: Optional[Mapping[str, Any]] = None,
    ) -> None:
        user_id = self.user_id
        if user_id is None:
            _no_user(f"track({event_type!r})")
            return
        self.client.track(user_id, event_type, properties, context)

    def identify(self, **kwargs: Any) -> None:
        user_id = self.user_id
        if user_id is None:
            _no_user("identify()")
            return
        self.client.identify(user_id, **kwargs)

    def __repr__(self) -> str:
        found = self._user_id
        return f"BoundWhisperr(user_id={'unresolved' if found is None else repr(found)})"


_warned_no_user = threading.Event()


def _no_user(call: str) -> None:
    if _warned_no_user.is_set():
        log.debug("no user on this request; %s recorded nothing", call)
        return
    _warned_no_user.set()
    log.warning(
        "no user on this request, so request.whisperr.%s recorded nothing (said once per "
        "process). Anonymous requests record nothing. If your authentication returns its user "
        "(a FastAPI dependency, say) instead of setting request.user or request.state.user, "
        "bind it: request.state.whisperr.user_id = user.id, or resolve_user=...",
        call,
    )


def resolver_user_id(resolve: ResolveUser, request: Any) -> Optional[str]:
    """The id ``resolve(request)`` names; a resolver that raises names none (DEBUG)."""
    try:
        return resolve_user_id(resolve(request))
    except Exception:
        log.debug("resolve_user raised; no user bound", exc_info=True)
        return None


def first_user_id(
    *lookups: Callable[[], Any], read: Callable[[Any], Optional[str]] = resolve_user_id
) -> Optional[str]:
    """The id ``read`` finds in the first candidate that has one, each candidate fetched by
    its lookup only if those before it had none. A lookup or a read that raises (a session
    store that is down, a user object whose id property fails) counts as no user, logged
    at DEBUG: the request goes on."""
    for lookup in lookups:
        try:
            user_id = read(lookup())
        except Exception:
            log.debug("looking up the request's user raised", exc_info=True)
            continue
        if user_id is not None:
            return user_id
    return None
