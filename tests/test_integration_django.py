"""The Django middleware and get_client(), through Django's own test clients and a real
auth + sessions stack (a SQLite database file), against the devserver.

Django's settings can be configured once per process: this module configures them (if no
one has) with the auth and session apps and this module as ROOT_URLCONF; every test sets
its ``WHISPERR_*`` names and MIDDLEWARE with ``override_settings``, whose exit rebuilds the
process-wide client (the integration listens to ``setting_changed``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

import django
import pytest
from asgiref.sync import iscoroutinefunction
from conftest import API_KEY
from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.test import AsyncClient, Client, override_settings
from django.urls import path
from django.utils.functional import empty

from whisperr_durable.devserver import DevServer
from whisperr_durable.integrations import BoundWhisperr
from whisperr_durable.integrations import django as wdjango
from whisperr_durable.integrations.django import (
    WhisperrMiddleware,
    get_client,
    user_id_of,
)

OURS = "whisperr_durable.integrations.django.WhisperrMiddleware"
OFFICIAL = "whisperr.django.WhisperrMiddleware"
AUTH = [
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
]


# ---- views and urls (this module is the ROOT_URLCONF) ----


def track_view(request: HttpRequest) -> HttpResponse:
    request.whisperr.track("plan_upgraded", {"plan": "pro"})
    return JsonResponse({"user_id": request.whisperr.user_id})


def identify_view(request: HttpRequest) -> HttpResponse:
    request.whisperr.identify(traits={"plan": "pro"}, email="a@example.com")
    return HttpResponse("ok")


def signup_view(request: HttpRequest) -> HttpResponse:
    from django.contrib.auth import login
    from django.contrib.auth.models import User

    request.whisperr.track("signup_started")  # anonymous: dropped
    user = User.objects.create_user(username=request.GET["username"])
    login(request, user)
    request.whisperr.track("signed_up")
    return HttpResponse(str(user.pk))


async def async_track_view(request: HttpRequest) -> HttpResponse:
    whisperr = request.whisperr
    whisperr.track("async_event", {"n": 1})
    user = request.__dict__.get("user")
    return JsonResponse(
        {
            "user_id": whisperr.user_id,
            # True where request.user was loaded (a sync lookup) rather than request.auser().
            "user_loaded": getattr(user, "_wrapped", None) is not empty,
        }
    )


async def async_signup_view(request: HttpRequest) -> HttpResponse:
    from django.contrib.auth import alogin
    from django.contrib.auth.models import User

    user = await User.objects.aget(username=request.GET["username"])
    await alogin(request, user)
    request.whisperr.track("signed_up")
    return HttpResponse(str(user.pk))


async def async_track_several_view(request: HttpRequest) -> HttpResponse:
    for n in range(3):
        request.whisperr.track("async_event", {"n": n})
    return JsonResponse({"user_id": request.whisperr.user_id})


async def async_signup_with_resolver_view(request: HttpRequest) -> HttpResponse:
    from django.contrib.auth import alogin
    from django.contrib.auth.models import User

    user = await User.objects.aget(username=request.GET["username"])
    await alogin(request, user)
    request.whisperr.track("before_the_id_is_set")  # a resolver is not called in the loop
    request.whisperr.user_id = f"u-{user.username}"
    request.whisperr.track("signed_up")
    return HttpResponse("ok")


def set_user_id_view(request: HttpRequest) -> HttpResponse:
    request.whisperr.user_id = request.GET["uid"]
    request.whisperr.track("explicit")
    return JsonResponse({"user_id": request.whisperr.user_id})


client_seen: list[Any] = []


def client_view(request: HttpRequest) -> HttpResponse:
    client_seen.append(request.whisperr.client)
    request.whisperr.track("threaded", {"n": int(request.GET["n"])})
    return HttpResponse("ok")


urlpatterns = [
    path("track/", track_view),
    path("identify/", identify_view),
    path("signup/", signup_view),
    path("async/", async_track_view),
    path("async-signup/", async_signup_view),
    path("client/", client_view),
    path("async-several/", async_track_several_view),
    path("async-signup-resolver/", async_signup_with_resolver_view),
    path("set-user-id/", set_user_id_view),
]


# ---- resolvers and a custom user middleware, by dotted path ----


def account_from_header(request: HttpRequest) -> Any:
    return request.headers.get("X-Account")


def failing_resolver(request: HttpRequest) -> Optional[str]:
    raise RuntimeError("resolver failed")


resolver_calls: list[tuple[int, bool]] = []


def recording_resolver(request: HttpRequest) -> Optional[str]:
    """Finds no user; records the thread it ran in and whether an event loop runs there."""
    try:
        asyncio.get_running_loop()
        in_loop = True
    except RuntimeError:
        in_loop = False
    resolver_calls.append((threading.get_ident(), in_loop))
    return None


class _RaisingPkUser:
    """An authenticated user whose ``pk`` property raises (a broken custom user model)."""

    is_authenticated = True

    @property
    def pk(self) -> Any:
        raise RuntimeError("pk is broken")


class RaisingPkUserMiddleware:
    def __init__(self, get_response: Any) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> Any:
        request.user = _RaisingPkUser()
        return self.get_response(request)


class _UuidUser:
    """A user whose primary key is not ``id`` (a custom user model with a UUID ``pk`` and an
    unrelated public ``id``): the Django default must use ``pk``."""

    is_authenticated = True
    pk = "6f1c2a9e-0000-4000-8000-00000000abcd"
    id = 42


class UuidUserMiddleware:
    def __init__(self, get_response: Any) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> Any:
        request.user = _UuidUser()
        return self.get_response(request)


# ---- fixtures ----


@pytest.fixture(scope="module")
def django_db(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Django configured once for the process, with a migrated SQLite database file."""
    if not settings.configured:
        settings.configure(
            SECRET_KEY="whisperr-durable-tests",
            ALLOWED_HOSTS=["testserver"],
            INSTALLED_APPS=[
                "django.contrib.contenttypes",
                "django.contrib.auth",
                "django.contrib.sessions",
            ],
            DATABASES={
                "default": {
                    "ENGINE": "django.db.backends.sqlite3",
                    "NAME": str(tmp_path_factory.mktemp("django") / "django.sqlite3"),
                }
            },
            ROOT_URLCONF=__name__,
            MIDDLEWARE=[],
            USE_TZ=True,
            DEFAULT_AUTO_FIELD="django.db.models.AutoField",
            PASSWORD_HASHERS=["django.contrib.auth.hashers.MD5PasswordHasher"],
            LOGGING_CONFIG=None,
        )
    elif not {"django.contrib.auth", "django.contrib.sessions"} <= set(settings.INSTALLED_APPS):
        pytest.skip("Django is already configured in this process without auth and sessions")
    django.setup()
    from django.core.management import call_command

    call_command("migrate", run_syncdb=True, verbosity=0)


@pytest.fixture
def whisperr_settings(server: DevServer, db_path: str, django_db: None) -> Iterator[dict[str, Any]]:
    """The WHISPERR_* settings for a test (nothing is sent before a flush), with our
    middleware after Django's auth; the client is rebuilt from them and shut down after."""
    values: dict[str, Any] = {
        "ROOT_URLCONF": __name__,
        "MIDDLEWARE": [*AUTH, OURS],
        "WHISPERR_API_KEY": API_KEY,
        "WHISPERR_BASE_URL": server.url,
        "WHISPERR_DB_PATH": db_path,
        "WHISPERR_FLUSH_AT": 100_000,
        "WHISPERR_FLUSH_INTERVAL": 3600.0,
        "WHISPERR_SHUTDOWN_TIMEOUT": 2.0,
    }
    with override_settings(**values):
        yield values
    wdjango._reset_client()


_users = iter(range(1_000_000))


def make_user() -> Any:
    from django.contrib.auth.models import User

    return User.objects.create_user(username=f"user{next(_users)}")


def logged_in(user: Any, client: Optional[Client] = None) -> Client:
    client = client or Client()
    client.force_login(user)
    return client


def flushed() -> None:
    result = get_client().flush(timeout=10)
    assert result, result


# ---- tests ----


def test_authenticated_request_tracks_as_user_pk(whisperr_settings: Any, server: DevServer) -> None:
    user = make_user()
    response = logged_in(user).get("/track/")
    assert response.status_code == 200
    assert response.json() == {"user_id": str(user.pk)}
    assert get_client().stats().pending == 1  # on disk, not yet sent
    flushed()
    [event] = server.events
    assert event["external_user_id"] == str(user.pk)
    assert event["event_type"] == "plan_upgraded"
    assert event["properties"] == {"plan": "pro"}


def test_identify_binds_the_user(whisperr_settings: Any, server: DevServer) -> None:
    user = make_user()
    assert logged_in(user).get("/identify/").status_code == 200
    flushed()
    [body] = server.identifies
    assert body["external_user_id"] == str(user.pk)
    assert body["traits"] == {"plan": "pro"}


def test_anonymous_request_queues_and_sends_nothing(
    whisperr_settings: Any, server: DevServer
) -> None:
    response = Client().get("/track/")
    assert response.status_code == 200
    assert response.json() == {"user_id": None}
    assert get_client().stats().pending == 0
    # A tracked request after it: the server gets that one event and nothing else.
    user = make_user()
    logged_in(user).get("/track/")
    flushed()
    assert [e["external_user_id"] for e in server.events] == [str(user.pk)]


def test_no_auth_middleware_means_no_user(whisperr_settings: Any, server: DevServer) -> None:
    with override_settings(MIDDLEWARE=[OURS]):
        assert Client().get("/track/").json() == {"user_id": None}
        assert get_client().stats().pending == 0


def test_pk_is_used_when_it_is_not_id(whisperr_settings: Any, server: DevServer) -> None:
    with override_settings(MIDDLEWARE=[f"{__name__}.UuidUserMiddleware", OURS]):
        assert Client().get("/track/").status_code == 200
        flushed()
    assert [e["external_user_id"] for e in server.events] == [_UuidUser.pk]


def test_user_id_of() -> None:
    from django.contrib.auth.models import AnonymousUser

    assert user_id_of(_UuidUser()) == _UuidUser.pk
    assert user_id_of(AnonymousUser()) is None
    assert user_id_of(None) is None


def test_track_after_login_in_the_same_request(whisperr_settings: Any, server: DevServer) -> None:
    response = Client().get("/signup/", {"username": "newcomer"})
    assert response.status_code == 200
    flushed()
    # The event before login() had no user; the one after it has the new user.
    assert [(e["event_type"], e["external_user_id"]) for e in server.events] == [
        ("signed_up", response.content.decode())
    ]


def test_resolver_by_dotted_path(whisperr_settings: Any, server: DevServer) -> None:
    with override_settings(WHISPERR_RESOLVE_USER=f"{__name__}.account_from_header"):
        client = logged_in(make_user())  # the resolver wins over request.user
        assert client.get("/track/", headers={"X-Account": "acct_7"}).json() == {
            "user_id": "acct_7"
        }
        assert client.get("/track/").json() == {"user_id": None}
        flushed()
    assert [e["external_user_id"] for e in server.events] == ["acct_7"]


def test_resolver_as_callable(whisperr_settings: Any, server: DevServer) -> None:
    with override_settings(WHISPERR_RESOLVE_USER=lambda request: request.GET.get("uid")):
        assert Client().get("/track/", {"uid": "u9"}).status_code == 200
        flushed()
    assert [e["external_user_id"] for e in server.events] == ["u9"]


def test_a_failing_resolver_binds_no_user(whisperr_settings: Any, server: DevServer) -> None:
    with override_settings(WHISPERR_RESOLVE_USER=f"{__name__}.failing_resolver"):
        assert Client().get("/track/").json() == {"user_id": None}
        assert get_client().stats().pending == 0


def test_middleware_is_sync_and_async_capable(whisperr_settings: Any) -> None:
    async def async_get_response(request: Any) -> HttpResponse:
        return HttpResponse()

    def sync_get_response(request: Any) -> HttpResponse:
        return HttpResponse()

    assert WhisperrMiddleware.sync_capable and WhisperrMiddleware.async_capable
    assert iscoroutinefunction(WhisperrMiddleware(async_get_response))
    assert not iscoroutinefunction(WhisperrMiddleware(sync_get_response))


def test_async_view_with_async_client(whisperr_settings: Any, server: DevServer) -> None:
    user = make_user()
    client = AsyncClient()
    client.force_login(user)

    async def requests() -> list[Any]:
        signed_in = await client.get("/async/")
        anonymous = await AsyncClient().get("/async/")
        await get_client().aflush(timeout=10)
        return [signed_in.json(), anonymous.json()]

    signed_in, anonymous = asyncio.run(requests())
    # Bound with request.auser(): request.user was never loaded synchronously.
    assert signed_in == {"user_id": str(user.pk), "user_loaded": False}
    assert anonymous["user_id"] is None
    assert [(e["event_type"], e["external_user_id"]) for e in server.events] == [
        ("async_event", str(user.pk))
    ]


def test_async_view_tracks_after_alogin(whisperr_settings: Any, server: DevServer) -> None:
    user = make_user()

    async def request() -> Any:
        return await AsyncClient().get("/async-signup/", {"username": user.username})

    assert asyncio.run(request()).status_code == 200
    flushed()
    assert [e["external_user_id"] for e in server.events] == [str(user.pk)]


def test_async_path_runs_a_resolver_that_reads_the_database(
    whisperr_settings: Any, server: DevServer
) -> None:
    # A resolver may load request.user (a database query): in the async path it runs in a
    # thread, not in the event loop (where Django would refuse the query).
    user = make_user()
    client = AsyncClient()
    client.force_login(user)
    with override_settings(WHISPERR_RESOLVE_USER=lambda request: f"u-{request.user.username}"):
        response = asyncio.run(client.get("/async/"))
        flushed()
    assert response.json()["user_id"] == f"u-{user.username}"
    assert [e["external_user_id"] for e in server.events] == [f"u-{user.username}"]


def test_async_anonymous_session_is_not_looked_up_in_the_loop(
    whisperr_settings: Any, server: DevServer, caplog: pytest.LogCaptureFixture
) -> None:
    # A visitor whose session names a user that is gone: request.auser() finds no one, and
    # request.user stays an unloaded lazy object; loading it in the event loop would be a
    # query Django refuses (SynchronousOnlyOperation).
    user = make_user()
    client = AsyncClient()
    client.force_login(user)
    user.delete()
    caplog.set_level(logging.DEBUG, logger="whisperr_durable")
    response = asyncio.run(client.get("/async-several/"))
    assert response.status_code == 200
    assert response.json() == {"user_id": None}
    assert get_client().stats().pending == 0
    raised = [r for r in caplog.records if r.exc_info]
    assert raised == [], [r.exc_info[1] for r in raised if r.exc_info]
    skipped = [r for r in caplog.records if "recorded nothing" in r.getMessage()]
    assert len(skipped) == 3  # each track() said why it did nothing


def test_async_path_calls_a_resolver_once_outside_the_loop(
    whisperr_settings: Any, server: DevServer
) -> None:
    client = AsyncClient()
    session = client.session
    session["cart"] = [1]
    session.save()
    resolver_calls.clear()
    with override_settings(WHISPERR_RESOLVE_USER=f"{__name__}.recording_resolver"):
        response = asyncio.run(client.get("/async-several/"))
        assert get_client().stats().pending == 0
    assert response.json() == {"user_id": None}
    # Once, at request start, in a worker thread; never again from track() in the loop.
    assert [in_loop for _, in_loop in resolver_calls] == [False]


def test_async_view_under_a_sync_stack_calls_no_resolver_in_the_loop(
    whisperr_settings: Any, server: DevServer
) -> None:
    # The sync test client: the middleware runs sync, the async view in an event loop.
    resolver_calls.clear()
    with override_settings(WHISPERR_RESOLVE_USER=f"{__name__}.recording_resolver"):
        assert Client().get("/async-several/").json() == {"user_id": None}
        assert get_client().stats().pending == 0
    assert [in_loop for _, in_loop in resolver_calls] == [False]


def test_async_alogin_with_a_resolver_then_set_user_id(
    whisperr_settings: Any, server: DevServer
) -> None:
    user = make_user()
    resolver_calls.clear()
    with override_settings(WHISPERR_RESOLVE_USER=f"{__name__}.recording_resolver"):
        response = asyncio.run(
            AsyncClient().get("/async-signup-resolver/", {"username": user.username})
        )
        assert response.status_code == 200
        flushed()
    assert [in_loop for _, in_loop in resolver_calls] == [False]
    assert [(e["event_type"], e["external_user_id"]) for e in server.events] == [
        ("signed_up", f"u-{user.username}")
    ]


def test_setting_user_id_binds_it(whisperr_settings: Any, server: DevServer) -> None:
    # Anonymous, then a logged-in user: the id set wins, normalised like any other.
    assert Client().get("/set-user-id/", {"uid": " u_123 "}).json() == {"user_id": "u_123"}
    assert logged_in(make_user()).get("/set-user-id/", {"uid": "u_456"}).json() == {
        "user_id": "u_456"
    }
    flushed()
    assert [e["external_user_id"] for e in server.events] == ["u_123", "u_456"]


def test_a_user_whose_pk_raises_is_no_user(
    whisperr_settings: Any, server: DevServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="whisperr_durable")
    with override_settings(MIDDLEWARE=[f"{__name__}.RaisingPkUserMiddleware", OURS]):
        assert Client().get("/track/").json() == {"user_id": None}
        response = asyncio.run(AsyncClient().get("/async-several/"))
        assert response.status_code == 200
        assert response.json() == {"user_id": None}
        assert get_client().stats().pending == 0
    assert any(r.exc_info and "pk is broken" in str(r.exc_info[1]) for r in caplog.records), (
        caplog.records
    )


def test_settings_names(whisperr_settings: Any, server: DevServer, db_path: str) -> None:
    with override_settings(WHISPERR_APP_VERSION="9.9.9"):
        user = make_user()
        logged_in(user).get("/track/")
        client = get_client()
        assert client.path == db_path
        assert os.path.exists(db_path)
        flushed()
    [event] = server.events
    assert event["context"]["app_version"] == "9.9.9"
    assert event["context"]["sdk_name"]


def test_disabled_stores_and_sends_nothing(
    whisperr_settings: Any, server: DevServer, db_path: str
) -> None:
    with override_settings(WHISPERR_DISABLED=True, WHISPERR_API_KEY=None):
        user = make_user()
        assert logged_in(user).get("/track/").json() == {"user_id": str(user.pk)}
        assert not get_client().ready
        assert get_client().stats().pending == 0
        assert get_client().flush(timeout=1)
    assert not os.path.exists(db_path)
    assert server.requests == []


def test_get_client_is_one_shared_client(whisperr_settings: Any, db_path: str) -> None:
    wdjango._reset_client()
    barrier = threading.Barrier(8)
    seen: list[Any] = []

    def first_use() -> None:
        barrier.wait()
        seen.append(get_client())

    threads = [threading.Thread(target=first_use) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert len(seen) == 8
    assert all(client is seen[0] for client in seen)
    assert get_client() is seen[0]
    assert seen[0].path == db_path


def test_override_settings_rebuilds_the_client(
    whisperr_settings: Any, tmp_path: Path, db_path: str
) -> None:
    before = get_client()
    other = str(tmp_path / "other.db")
    with override_settings(WHISPERR_DB_PATH=other):
        assert get_client() is not before
        assert get_client().path == other
    assert get_client().path == db_path


def test_official_path_swapped_for_ours(whisperr_settings: Any, server: DevServer) -> None:
    """The same settings and view code with the official middleware, then with ours: the
    server receives the same event from both."""
    import whisperr.django as official

    user = make_user()
    try:
        with override_settings(MIDDLEWARE=[*AUTH, OFFICIAL]):
            assert logged_in(user).get("/track/").json() == {"user_id": str(user.pk)}
            official.get_client().flush()
    finally:
        if official._client is not None:
            official._client.shutdown()
        official._client = None
    assert logged_in(user).get("/track/").json() == {"user_id": str(user.pk)}
    flushed()
    theirs, ours = server.events
    for field in ("external_user_id", "event_type", "properties"):
        assert theirs[field] == ours[field]
    assert ours["external_user_id"] == str(user.pk)
    assert theirs["context"]["sdk_name"] != ours["context"]["sdk_name"]


def test_many_requests_from_threads_share_the_client(
    whisperr_settings: Any, server: DevServer
) -> None:
    from django.db import connections

    threads_n, per_thread = 6, 25
    users = [make_user() for _ in range(threads_n)]
    clients = [logged_in(user) for user in users]
    client_seen.clear()
    errors: list[BaseException] = []

    def run(client: Client) -> None:
        try:
            for n in range(per_thread):
                assert client.get("/client/", {"n": n}).status_code == 200
        except BaseException as exc:
            errors.append(exc)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=run, args=(c,)) for c in clients]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    total = threads_n * per_thread
    assert len(client_seen) == total
    assert all(c is get_client() for c in client_seen)
    flushed()
    assert server.wait_for_events(total, timeout=10)
    events = server.events
    assert len(events) == total
    for user in users:
        mine = [e["properties"]["n"] for e in events if e["external_user_id"] == str(user.pk)]
        assert sorted(mine) == list(range(per_thread))


def test_request_whisperr_type(whisperr_settings: Any) -> None:
    seen: list[Any] = []

    def view(request: Any) -> HttpResponse:
        seen.append(request.whisperr)
        return HttpResponse()

    middleware = WhisperrMiddleware(view)
    request = HttpRequest()
    middleware(request)
    [whisperr] = seen
    assert isinstance(whisperr, BoundWhisperr)
    assert whisperr.client is get_client() is middleware.client
    assert whisperr.user_id is None


def test_the_asgi_lifespan_shutdown_delivers_what_was_tracked(
    whisperr_settings: Any, server: DevServer
) -> None:
    from whisperr_durable.integrations.django import asgi_application

    application = asgi_application()
    user = make_user()
    client = AsyncClient()
    client.force_login(user)

    async def lifespan(messages: list[str]) -> list[str]:
        incoming: asyncio.Queue[dict[str, str]] = asyncio.Queue()
        for message in messages:
            incoming.put_nowait({"type": message})
        sent: list[str] = []

        async def send(message: dict[str, Any]) -> None:
            sent.append(message["type"])

        await application({"type": "lifespan", "asgi": {"version": "3.0"}}, incoming.get, send)
        return sent

    async def run() -> list[str]:
        started = await lifespan(["lifespan.startup", "lifespan.shutdown"])
        assert (await client.get("/async/")).status_code == 200
        assert server.events == []  # flush_at and flush_interval never came
        return started + await lifespan(["lifespan.shutdown"])

    sent = asyncio.run(run())
    assert sent == [
        "lifespan.startup.complete",
        "lifespan.shutdown.complete",
        "lifespan.shutdown.complete",
    ]
    assert [(e["event_type"], e["external_user_id"]) for e in server.events] == [
        ("async_event", str(user.pk))
    ]


def test_the_middleware_checks_the_settings_at_startup_without_making_a_client(
    whisperr_settings: Any,
) -> None:
    from django.test import override_settings

    from whisperr_durable.integrations.django import WhisperrMiddleware

    wdjango._reset_client()
    WhisperrMiddleware(lambda request: None)
    assert wdjango._client is None  # under gunicorn --preload: none in the master
    with override_settings(WHISPERR_FLUSH_AT="often"), pytest.raises(ValueError, match="FLUSH_AT"):
        WhisperrMiddleware(lambda request: None)


def test_a_leftover_import_of_the_official_sdk_is_said_once(
    whisperr_settings: Any, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys

    import whisperr.django  # noqa: F401  (what code that was not migrated still imports)

    assert "whisperr.django" in sys.modules
    monkeypatch.setattr(wdjango, "_official_noticed", threading.Event())  # a fresh process
    with caplog.at_level(logging.WARNING, logger="whisperr_durable"):
        get_client()
        get_client()
    said = [r.getMessage() for r in caplog.records if "official SDK" in r.getMessage()]
    assert len(said) == 1
    assert "whisperr_durable.integrations.django" in said[0]
