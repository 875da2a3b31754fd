"""The Starlette / FastAPI integration, through the frameworks' real test clients."""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional

import pytest
from conftest import API_KEY, MakeClient
from fastapi import Depends, FastAPI
from starlette.applications import Starlette
from starlette.authentication import (
    AuthCredentials,
    AuthenticationBackend,
    BaseUser,
    SimpleUser,
)
from starlette.middleware import Middleware
from starlette.middleware.authentication import AuthenticationMiddleware
from starlette.requests import HTTPConnection, Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route, WebSocketRoute
from starlette.testclient import TestClient
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.websockets import WebSocket

from whisperr_durable import DurableWhisperr
from whisperr_durable.devserver import DevServer
from whisperr_durable.integrations import asgi
from whisperr_durable.integrations.asgi import (
    BoundWhisperr,
    WhisperrMiddleware,
    default_user_id,
    get_client,
    whisperr_dependency,
)


class Account(BaseUser):
    """An app's own user class: an ``id`` and no ``identity``."""

    def __init__(self, account_id: int) -> None:
        self.id = account_id

    @property
    def is_authenticated(self) -> bool:
        return True


class HeaderAuth(AuthenticationBackend):
    """``X-User: alice`` gives SimpleUser("alice"); ``X-Account: 42`` gives Account(42)."""

    async def authenticate(
        self, conn: HTTPConnection
    ) -> Optional[tuple[AuthCredentials, BaseUser]]:
        if "x-user" in conn.headers:
            return AuthCredentials(["authenticated"]), SimpleUser(conn.headers["x-user"])
        if "x-account" in conn.headers:
            return AuthCredentials(["authenticated"]), Account(int(conn.headers["x-account"]))
        return None


class StateUserMiddleware:
    """An app's own auth: ``request.state.user`` from an ``X-State-User`` header."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            user = HTTPConnection(scope).headers.get("x-state-user")
            if user is not None:
                scope.setdefault("state", {})["user"] = {"id": user}
        await self.app(scope, receive, send)


async def track_endpoint(request: Request) -> PlainTextResponse:
    whisperr = request.state.whisperr
    whisperr.track("page_viewed", {"path": request.url.path})
    return PlainTextResponse(f"BoundWhisperr(user_id={whisperr.user_id!r})")


def user_ids(server: DevServer) -> list[str]:
    return [event["external_user_id"] for event in server.events]


def starlette_app(
    client: DurableWhisperr, *, auth_outside: bool = False, **options: Any
) -> Starlette:
    middleware = [
        Middleware(WhisperrMiddleware, client=client, **options),
        Middleware(AuthenticationMiddleware, backend=HeaderAuth()),
    ]
    if auth_outside:
        middleware.reverse()
    return Starlette(routes=[Route("/", track_endpoint)], middleware=middleware)


@pytest.mark.parametrize("auth_outside", [False, True], ids=["ours-outside", "auth-outside"])
@pytest.mark.parametrize(
    ("headers", "expected"),
    [({"X-User": "alice"}, "alice"), ({"X-Account": "42"}, "42")],
    ids=["SimpleUser", "user-with-id"],
)
def test_authenticated_user_is_tracked(
    make_client: MakeClient,
    server: DevServer,
    headers: dict[str, str],
    expected: str,
    auth_outside: bool,
) -> None:
    client = make_client()
    with TestClient(starlette_app(client, auth_outside=auth_outside)) as http:
        response = http.get("/", headers=headers)
    assert response.status_code == 200
    assert response.text == f"BoundWhisperr(user_id={expected!r})"
    assert client.flush(timeout=10)
    assert user_ids(server) == [expected]
    assert server.events[0]["event_type"] == "page_viewed"
    assert server.events[0]["properties"] == {"path": "/"}


def test_no_user_queues_nothing(make_client: MakeClient, server: DevServer) -> None:
    client = make_client()
    bare = Starlette(
        routes=[Route("/", track_endpoint)],
        middleware=[Middleware(WhisperrMiddleware, client=client)],
    )
    with TestClient(starlette_app(client)) as http, TestClient(bare) as bare_http:
        assert http.get("/").text == "BoundWhisperr(user_id=None)"  # UnauthenticatedUser
        assert bare_http.get("/").text == "BoundWhisperr(user_id=None)"  # no auth at all
    assert client.stats().pending == 0
    assert client.flush(timeout=10)
    assert server.events == []


def test_state_user_from_the_apps_middleware(make_client: MakeClient, server: DevServer) -> None:
    client = make_client()
    app = Starlette(
        routes=[Route("/", track_endpoint)],
        middleware=[
            Middleware(StateUserMiddleware),
            Middleware(WhisperrMiddleware, client=client),
        ],
    )
    with TestClient(app) as http:
        assert http.get("/", headers={"X-State-User": "u-7"}).status_code == 200
        assert http.get("/").status_code == 200
    assert client.flush(timeout=10)
    assert user_ids(server) == ["u-7"]


def test_scope_user_wins_over_state_user(make_client: MakeClient, server: DevServer) -> None:
    client = make_client()
    app = starlette_app(client)
    app.add_middleware(StateUserMiddleware)
    with TestClient(app) as http:
        http.get("/", headers={"X-User": "alice", "X-State-User": "u-7"})
        http.get("/", headers={"X-State-User": "u-8"})  # UnauthenticatedUser: state is next
    assert client.flush(timeout=10)
    assert user_ids(server) == ["alice", "u-8"]


def test_resolve_user_override(make_client: MakeClient, server: DevServer) -> None:
    client = make_client()
    seen: list[type] = []

    def resolve(request: Request) -> Optional[str]:
        seen.append(type(request))
        return request.headers.get("x-tenant-user")

    with TestClient(starlette_app(client, resolve_user=resolve)) as http:
        http.get("/", headers={"X-Tenant-User": "t-1", "X-User": "alice"})
        http.get("/", headers={"X-User": "alice"})  # the resolver finds none: no default
    assert client.flush(timeout=10)
    assert user_ids(server) == ["t-1"]
    assert seen and set(seen) == {Request}  # looked up again while no user is found


def test_resolver_that_raises_binds_no_user(make_client: MakeClient, server: DevServer) -> None:
    client = make_client()

    def resolve(request: Request) -> str:
        raise LookupError("no session store")

    with TestClient(starlette_app(client, resolve_user=resolve)) as http:
        assert http.get("/", headers={"X-User": "alice"}).status_code == 200
    assert client.flush(timeout=10)
    assert server.events == []


def test_websocket_scope(make_client: MakeClient, server: DevServer) -> None:
    client = make_client()

    async def ws_endpoint(websocket: WebSocket) -> None:
        await websocket.accept()
        websocket.state.whisperr.track("socket_opened")
        await websocket.send_text("ok")
        await websocket.close()

    app = Starlette(
        routes=[WebSocketRoute("/ws", ws_endpoint)],
        middleware=[
            Middleware(WhisperrMiddleware, client=client),
            Middleware(AuthenticationMiddleware, backend=HeaderAuth()),
        ],
    )
    with TestClient(app) as http, http.websocket_connect("/ws", headers={"X-User": "bob"}) as ws:
        assert ws.receive_text() == "ok"
    assert client.flush(timeout=10)
    assert user_ids(server) == ["bob"]
    assert server.events[0]["event_type"] == "socket_opened"


def fastapi_app(client: DurableWhisperr) -> FastAPI:
    """Async and sync endpoints, through the middleware and through the dependency."""
    app = FastAPI()
    app.add_middleware(WhisperrMiddleware, client=client)
    app.add_middleware(AuthenticationMiddleware, backend=HeaderAuth())
    dep = whisperr_dependency(client)

    @app.get("/async")
    async def async_view(request: Request) -> dict[str, Any]:
        request.state.whisperr.track("async_view")
        return {}

    @app.get("/sync")
    def sync_view(request: Request) -> dict[str, Any]:
        request.state.whisperr.track("sync_view")
        return {}

    @app.get("/dep-async")
    async def dep_async(w: BoundWhisperr = Depends(dep)) -> dict[str, Any]:  # noqa: B008
        w.track("dep_async")
        return {"user_id": w.user_id}

    @app.get("/dep-sync")
    def dep_sync(w: BoundWhisperr = Depends(dep)) -> dict[str, Any]:  # noqa: B008
        w.track("dep_sync")
        return {"user_id": w.user_id}

    return app


def test_fastapi_middleware_and_dependency(make_client: MakeClient, server: DevServer) -> None:
    client = make_client()
    with TestClient(fastapi_app(client)) as http:
        for path in ("/async", "/sync", "/dep-async", "/dep-sync"):
            assert http.get(path, headers={"X-Account": "9"}).status_code == 200
            assert http.get(path).status_code == 200  # no user: nothing
    assert client.flush(timeout=10)
    assert sorted((e["external_user_id"], e["event_type"]) for e in server.events) == [
        ("9", "async_view"),
        ("9", "dep_async"),
        ("9", "dep_sync"),
        ("9", "sync_view"),
    ]


def test_fastapi_dependency_without_middleware(make_client: MakeClient, server: DevServer) -> None:
    client = make_client()
    app = FastAPI()

    def current_user(request: Request) -> None:
        if "x-state-user" in request.headers:
            request.state.user = {"sub": request.headers["x-state-user"]}

    whisperr = whisperr_dependency(client)
    by_query = whisperr_dependency(client, lambda request: request.query_params.get("u"))

    @app.post("/upgrade")
    def upgrade(
        w: BoundWhisperr = Depends(whisperr),  # noqa: B008
        _user: None = Depends(current_user),  # runs after the whisperr dependency
    ) -> dict[str, Any]:
        w.track("plan_upgraded", {"plan": "pro"})
        w.identify(traits={"plan": "pro"}, email="ann@example.com")
        return {}

    @app.get("/override")
    def override(w: BoundWhisperr = Depends(by_query)) -> dict[str, Any]:  # noqa: B008
        w.track("override_used")
        return {}

    @app.websocket("/ws")
    async def ws(websocket: WebSocket, w: BoundWhisperr = Depends(by_query)) -> None:  # noqa: B008
        await websocket.accept()
        w.track("socket_opened")
        await websocket.close()

    with TestClient(app) as http:
        assert http.post("/upgrade", headers={"X-State-User": "ann"}).status_code == 200
        assert http.post("/upgrade").status_code == 200
        assert http.get("/override", params={"u": "q-1"}).status_code == 200
        with http.websocket_connect("/ws?u=ws-1"):
            pass
        with http.websocket_connect("/ws"):
            pass  # the resolver finds no user: nothing
    assert client.flush(timeout=10)
    assert [(e["external_user_id"], e["event_type"]) for e in server.events] == [
        ("ann", "plan_upgraded"),
        ("q-1", "override_used"),
        ("ws-1", "socket_opened"),
    ]
    assert server.events[0]["properties"] == {"plan": "pro"}
    assert [i["external_user_id"] for i in server.identifies] == ["ann"]


def test_one_client_shared_by_sync_and_async_endpoints(
    make_client: MakeClient, server: DevServer
) -> None:
    client = make_client()
    app = fastapi_app(client)
    in_sync_view = threading.Barrier(4, timeout=10)
    sync_threads: set[int] = set()

    @app.get("/sync-together")
    def sync_together(request: Request) -> dict[str, Any]:
        in_sync_view.wait()  # four requests inside sync endpoints at once: four threads
        sync_threads.add(threading.get_ident())
        for _ in range(25):
            request.state.whisperr.track("sync_burst")
        return {}

    def requests(http: TestClient, n: int) -> list[int]:
        paths = ["/sync-together"] + ["/async", "/sync", "/dep-async", "/dep-sync"] * 5
        return [http.get(p, headers={"X-Account": str(n)}).status_code for p in paths]

    with TestClient(app) as http, ThreadPoolExecutor(4) as pool:
        statuses = [s for batch in pool.map(lambda n: requests(http, n), range(4)) for s in batch]
    assert statuses == [200] * 84
    assert len(sync_threads) == 4
    assert client.flush(timeout=30)
    assert len(server.events) == 4 * (25 + 20)
    for n in range(4):
        mine = [e["event_type"] for e in server.events if e["external_user_id"] == str(n)]
        assert sorted(set(mine)) == [
            "async_view",
            "dep_async",
            "dep_sync",
            "sync_burst",
            "sync_view",
        ]
        assert len(mine) == 45


def test_aflush_inside_an_endpoint(make_client: MakeClient, server: DevServer) -> None:
    client = make_client()
    app = FastAPI()
    app.add_middleware(WhisperrMiddleware, client=client)
    app.add_middleware(AuthenticationMiddleware, backend=HeaderAuth())

    @app.post("/checkout")
    async def checkout(request: Request) -> dict[str, Any]:
        request.state.whisperr.track("checkout_completed", {"total": 12})
        result = await client.aflush(timeout=10)
        return {"ok": bool(result), "pending": result.pending, "seen": len(server.events)}

    with TestClient(app) as http:
        body = http.post("/checkout", headers={"X-User": "carol"}).json()
    assert body == {"ok": True, "pending": 0, "seen": 1}
    assert user_ids(server) == ["carol"]


def test_user_id_can_be_bound_during_the_request(
    make_client: MakeClient, server: DevServer
) -> None:
    client = make_client()

    async def login(request: Request) -> JSONResponse:
        request.state.whisperr.track("ignored_before_login")
        request.state.whisperr.user_id = "new-user"
        request.state.whisperr.track("signed_up")
        return JSONResponse({})

    app = Starlette(
        routes=[Route("/login", login, methods=["POST"])],
        middleware=[Middleware(WhisperrMiddleware, client=client)],
    )
    with TestClient(app) as http:
        assert http.post("/login").status_code == 200
    assert client.flush(timeout=10)
    assert [(e["external_user_id"], e["event_type"]) for e in server.events] == [
        ("new-user", "signed_up")
    ]


@pytest.mark.parametrize(
    ("user", "expected"),
    [
        (SimpleUser("alice"), "alice"),
        (Account(5), "5"),
        ({"user_id": "m-1"}, "m-1"),
        (None, None),
    ],
)
def test_default_user_id(user: Any, expected: Optional[str]) -> None:
    assert default_user_id(user) == expected


def test_default_user_id_of_starlette_users_without_an_id() -> None:
    from starlette.authentication import UnauthenticatedUser

    class NoIdentity(BaseUser):
        is_authenticated = True

        @property
        def display_name(self) -> str:
            return "Ann Smith"  # not an id: never used

    assert default_user_id(UnauthenticatedUser()) is None
    assert default_user_id(NoIdentity()) is None


def test_importing_the_package_imports_no_framework() -> None:
    code = (
        "import sys\n"
        "import whisperr_durable, whisperr_durable.integrations\n"
        "loaded = sorted(m for m in ('starlette', 'fastapi') if m in sys.modules)\n"
        "assert not loaded, loaded\n"
        "sys.modules['fastapi'] = None  # as if FastAPI were not installed\n"
        "from whisperr_durable.integrations import asgi\n"
        "assert 'starlette' in sys.modules and sys.modules['fastapi'] is None\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


class BrokenUser(BaseUser):
    """A user whose ``id`` (``X-Broken: id``) or ``identity`` (``X-Broken: identity``)
    raises, as a lazy attribute whose query fails would."""

    def __init__(self, what: str) -> None:
        self.what = what

    @property
    def is_authenticated(self) -> bool:
        return True

    def __getattr__(self, name: str) -> Any:
        if name == "id" and self.what == "id":
            raise RuntimeError("session store is down")
        raise AttributeError(name)

    @property
    def identity(self) -> str:
        raise ValueError("identity lookup failed")


class BrokenAuth(AuthenticationBackend):
    async def authenticate(
        self, conn: HTTPConnection
    ) -> Optional[tuple[AuthCredentials, BaseUser]]:
        return AuthCredentials(["authenticated"]), BrokenUser(conn.headers["x-broken"])


def test_a_user_whose_id_raises_binds_no_user(
    make_client: MakeClient, server: DevServer, caplog: pytest.LogCaptureFixture
) -> None:
    client = make_client()
    app = Starlette(
        routes=[Route("/", track_endpoint)],
        middleware=[
            Middleware(WhisperrMiddleware, client=client),
            Middleware(AuthenticationMiddleware, backend=BrokenAuth()),
            Middleware(StateUserMiddleware),
        ],
    )
    with TestClient(app) as http, caplog.at_level("DEBUG", logger="whisperr_durable"):
        by_id = http.get("/", headers={"X-Broken": "id"})
        by_identity = http.get("/", headers={"X-Broken": "identity"})
        next_one = http.get("/", headers={"X-Broken": "id", "X-State-User": "u-5"})
    assert (by_id.status_code, by_id.text) == (200, "BoundWhisperr(user_id=None)")
    assert (by_identity.status_code, by_identity.text) == (200, "BoundWhisperr(user_id=None)")
    assert next_one.text == "BoundWhisperr(user_id='u-5')"  # the next candidate is used
    assert "session store is down" in caplog.text
    assert "identity lookup failed" in caplog.text
    assert client.flush(timeout=10)
    assert user_ids(server) == ["u-5"]


class StateAuthMiddleware:
    """An app's own auth: ``request.state.auth`` (claims) from an ``X-Claims-User`` header."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        user = (
            HTTPConnection(scope).headers.get("x-claims-user") if scope["type"] == "http" else None
        )
        if user is not None:
            scope.setdefault("state", {})["auth"] = {"userId": user, "scopes": ["read"]}
        await self.app(scope, receive, send)


def test_state_auth_after_the_users(make_client: MakeClient, server: DevServer) -> None:
    client = make_client()
    app = starlette_app(client)
    app.add_middleware(StateUserMiddleware)
    app.add_middleware(StateAuthMiddleware)
    with TestClient(app) as http:
        assert http.get("/", headers={"X-Claims-User": "c-1"}).text == (
            "BoundWhisperr(user_id='c-1')"
        )
        http.get("/", headers={"X-Claims-User": "c-2", "X-State-User": "s-2"})  # user first
        http.get("/", headers={"X-Claims-User": "c-3", "X-User": "alice"})  # user first
    assert client.flush(timeout=10)
    assert user_ids(server) == ["c-1", "s-2", "alice"]


@pytest.fixture
def environment_client(
    server: DevServer, db_path: str, monkeypatch: pytest.MonkeyPatch
) -> Iterator[str]:
    """``WHISPERR_*`` environment variables for the test's server and outbox; the
    process-wide client is shut down and forgotten before and after."""
    asgi._reset_client()
    monkeypatch.setenv("WHISPERR_API_KEY", API_KEY)
    monkeypatch.setenv("WHISPERR_BASE_URL", server.url)
    monkeypatch.setenv("WHISPERR_DB_PATH", db_path)
    yield db_path
    asgi._reset_client()


def test_without_a_client_the_environment_configures_one(
    environment_client: str, server: DevServer
) -> None:
    app = FastAPI()
    app.add_middleware(WhisperrMiddleware)
    app.add_middleware(AuthenticationMiddleware, backend=HeaderAuth())
    whisperr = whisperr_dependency()

    @app.get("/middleware")
    def by_middleware(request: Request) -> dict[str, Any]:
        request.state.whisperr.track("by_middleware")
        return {}

    @app.get("/dependency")
    async def by_dependency(w: BoundWhisperr = Depends(whisperr)) -> dict[str, Any]:  # noqa: B008
        w.track("by_dependency")
        return {}

    with TestClient(app) as http:
        assert http.get("/middleware", headers={"X-User": "env-1"}).status_code == 200
        assert http.get("/dependency", headers={"X-User": "env-2"}).status_code == 200
    client = get_client()
    assert client is get_client()
    assert client.path == environment_client
    assert client.flush(timeout=10)
    assert sorted((e["external_user_id"], e["event_type"]) for e in server.events) == [
        ("env-1", "by_middleware"),
        ("env-2", "by_dependency"),
    ]


def test_get_client_builds_one_client_across_threads(environment_client: str) -> None:
    start = threading.Barrier(8, timeout=10)

    def first_use(_: int) -> DurableWhisperr:
        start.wait()
        return get_client()

    with ThreadPoolExecutor(8) as pool:
        clients = list(pool.map(first_use, range(8)))
    assert len({id(client) for client in clients}) == 1
    assert clients[0].path == environment_client


@pytest.mark.parametrize(
    ("name", "value"), [("WHISPERR_DISABLED", "false"), ("WHISPERR_FLUSH_AT", "5")]
)
def test_environment_strings_are_converted(
    environment_client: str, monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(name, value)
    assert get_client().ready


def test_the_lifespan_shutdown_delivers_what_the_app_tracked(
    make_client: MakeClient, server: DevServer
) -> None:
    # flush_at and flush_interval never come: only the shutdown hook can deliver.
    client = make_client()
    shut_down: list[str] = []

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        client.track("user_1", "app_shutting_down", {"i": 2})
        shut_down.append("app")

    app = Starlette(
        routes=[Route("/", track_endpoint)],
        middleware=[
            Middleware(WhisperrMiddleware, client=client),
            Middleware(AuthenticationMiddleware, backend=HeaderAuth()),
        ],
        lifespan=lifespan,
    )
    with TestClient(app) as http:
        assert http.get("/", headers={"X-User": "alice"}).status_code == 200
        assert server.events == []
    # The app's own shutdown handler ran first; what it tracked went too.
    assert shut_down == ["app"]
    assert [(e["external_user_id"], e["event_type"]) for e in server.events] == [
        ("alice", "page_viewed"),
        ("user_1", "app_shutting_down"),
    ]
    assert client.stats().pending == 0


def test_the_lifespan_shutdown_makes_no_client_when_none_was_used(
    monkeypatch: pytest.MonkeyPatch, server: DevServer, db_path: str
) -> None:
    asgi._reset_client()
    monkeypatch.setenv("WHISPERR_API_KEY", API_KEY)
    monkeypatch.setenv("WHISPERR_BASE_URL", server.url)
    monkeypatch.setenv("WHISPERR_DB_PATH", db_path)
    app = Starlette(
        routes=[Route("/", track_endpoint)], middleware=[Middleware(WhisperrMiddleware)]
    )
    with TestClient(app):
        pass  # no request: no client
    assert asgi._client is None
    assert not os.path.exists(db_path)


def test_an_auth_dependency_that_returns_its_user_is_warned_of_once_and_can_bind_it(
    make_client: MakeClient,
    server: DevServer,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from whisperr_durable.integrations import _common

    monkeypatch.setattr(_common, "_warned_no_user", threading.Event())  # a fresh process
    client = make_client()
    app = FastAPI()
    app.add_middleware(WhisperrMiddleware, client=client)

    def get_current_user(request: Request) -> dict[str, str]:
        return {"id": request.headers["x-user"]}  # returned, never put on request.state

    @app.post("/plain")
    def plain(request: Request, user: dict[str, str] = Depends(get_current_user)) -> None:  # noqa: B008
        request.state.whisperr.track("plan_upgraded")

    @app.post("/bound")
    def bound(request: Request, user: dict[str, str] = Depends(get_current_user)) -> None:  # noqa: B008
        request.state.whisperr.user_id = user["id"]  # as the README shows
        request.state.whisperr.track("plan_upgraded")

    with TestClient(app) as http, caplog.at_level(logging.DEBUG, logger="whisperr_durable"):
        for _ in range(3):
            assert http.post("/plain", headers={"X-User": "alice"}).status_code == 200
        assert http.post("/bound", headers={"X-User": "alice"}).status_code == 200
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1  # once per process; the other two at DEBUG
    assert "request.whisperr.track('plan_upgraded') recorded nothing" in warnings[0].getMessage()
    assert "user_id" in warnings[0].getMessage()
    assert client.flush(timeout=10).ok
    assert user_ids(server) == ["alice"]
