"""The Flask extension, with real Flask, real Flask-Login, a real outbox and the devserver."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Optional

import click
import flask_login
import httpx
import pytest
from conftest import API_KEY, MakeClient
from flask import Flask, g, request
from werkzeug.serving import make_server

from whisperr_durable import DurableWhisperr
from whisperr_durable.devserver import DevServer
from whisperr_durable.integrations import BoundWhisperr
from whisperr_durable.integrations.flask import (
    EXTENSION_KEY,
    Whisperr,
    current_client,
)

MakeApp = Callable[..., Flask]


class User:
    """A user as Flask-Login wants one (what ``UserMixin`` provides)."""

    is_authenticated = True
    is_active = True
    is_anonymous = False

    def __init__(self, user_id: str, name: str) -> None:
        self.id = user_id
        self.name = name

    def get_id(self) -> str:
        return self.id


USERS = {"u-1": User("u-1", "Ada"), "u-2": User("u-2", "Grace"), "u-3": User("u-3", "Edsger")}


def here() -> BoundWhisperr:
    """``request.whisperr`` (typed for mypy, which does not know Flask's request has it)."""
    return request.whisperr  # type: ignore[attr-defined,no-any-return]


def create_app(config: dict[str, Any], ext: Optional[Whisperr] = None) -> Flask:
    """An app with Flask-Login over ``USERS``; ``ext`` is initialised on it if given."""
    app = Flask(__name__)
    app.config.update(SECRET_KEY="test-secret", **config)
    login_manager = flask_login.LoginManager(app)
    app.config["user_loads"] = 0

    def load_user(user_id: str) -> Optional[User]:
        app.config["user_loads"] += 1
        return USERS.get(user_id)

    login_manager.user_loader(load_user)

    @app.post("/login/<user_id>")
    def login(user_id: str) -> str:
        flask_login.login_user(USERS[user_id])
        return "ok"

    @app.post("/login-and-track/<user_id>")
    def login_and_track(user_id: str) -> str:
        here().track("anonymous_click")  # before the login: no user yet
        flask_login.login_user(USERS[user_id])
        here().track("logged_in")
        return "ok"

    @app.post("/track/<event_type>")
    def track(event_type: str) -> str:
        here().track(event_type, {"n": request.args.get("n", "0")})
        return str(here().user_id)

    @app.post("/identify")
    def identify() -> str:
        here().identify(traits={"plan": "pro"}, email="ada@example.com")
        return "ok"

    @app.get("/nothing")
    def nothing() -> str:
        return "ok"

    if ext is not None:
        ext.init_app(app)
    return app


@pytest.fixture
def config(server: DevServer, db_path: str) -> dict[str, Any]:
    """``WHISPERR_*`` settings for the test's server and outbox; nothing sent before flush()."""
    return {
        "WHISPERR_API_KEY": API_KEY,
        "WHISPERR_BASE_URL": server.url,
        "WHISPERR_DB_PATH": db_path,
        "WHISPERR_FLUSH_AT": 100_000,
        "WHISPERR_FLUSH_INTERVAL": 3600.0,
    }


@pytest.fixture
def make_app(config: dict[str, Any]) -> Iterator[MakeApp]:
    """Apps with the extension initialised from their config; their clients are shut down."""
    apps: list[Flask] = []

    def make(ext: Optional[Whisperr] = None, **overrides: Any) -> Flask:
        app = create_app({**config, **overrides}, ext if ext is not None else Whisperr())
        apps.append(app)
        return app

    yield make
    for app in apps:
        app.extensions[EXTENSION_KEY].client.shutdown(timeout=0.5)


def client_of(app: Flask) -> DurableWhisperr:
    with app.app_context():
        return current_client()


def test_logged_in_request_tracks_for_its_user(make_app: MakeApp, server: DevServer) -> None:
    app = make_app()
    http = app.test_client()
    assert http.post("/login/u-2").status_code == 200
    response = http.post("/track/plan_upgraded?n=3")
    assert response.get_data(as_text=True) == "u-2"
    http.post("/identify")

    assert client_of(app).flush(timeout=10)
    assert [(e["external_user_id"], e["event_type"], e["properties"]) for e in server.events] == [
        ("u-2", "plan_upgraded", {"n": "3"})
    ]
    assert len(server.identifies) == 1
    assert server.identifies[0]["external_user_id"] == "u-2"
    assert server.identifies[0]["traits"] == {"plan": "pro"}


def test_anonymous_request_queues_and_sends_nothing(
    make_app: MakeApp, server: DevServer, caplog: pytest.LogCaptureFixture
) -> None:
    app = make_app()
    client = client_of(app)
    http = app.test_client()
    with caplog.at_level("DEBUG", logger="whisperr_durable"):
        assert http.post("/track/plan_upgraded").get_data(as_text=True) == "None"
        http.post("/identify")
    assert client.stats().pending == 0
    assert "no user on this request" in caplog.text

    # The same app does deliver once someone is logged in: the silence above was the user's.
    http.post("/login/u-1")
    http.post("/track/after_login")
    assert client.flush(timeout=10)
    assert [(e["external_user_id"], e["event_type"]) for e in server.events] == [
        ("u-1", "after_login")
    ]
    assert server.identifies == []


def test_user_is_looked_up_only_when_used(make_app: MakeApp, server: DevServer) -> None:
    app = make_app()
    http = app.test_client()
    http.post("/login/u-1")
    for _ in range(3):
        assert http.get("/nothing").status_code == 200
    assert app.config["user_loads"] == 0  # request.whisperr was there, never resolved
    http.post("/track/first")
    http.post("/track/second")
    assert app.config["user_loads"] == 2  # one per request that tracked (Flask-Login's cost)

    assert client_of(app).flush(timeout=10)
    assert [e["external_user_id"] for e in server.events] == ["u-1", "u-1"]


def test_login_view_tracks_after_login_user(make_app: MakeApp, server: DevServer) -> None:
    app = make_app()
    assert app.test_client().post("/login-and-track/u-3").status_code == 200
    assert client_of(app).flush(timeout=10)
    assert [(e["external_user_id"], e["event_type"]) for e in server.events] == [
        ("u-3", "logged_in")
    ]


def test_g_user_and_request_user_without_login_manager(
    make_client: MakeClient, server: DevServer
) -> None:
    client = make_client()
    app = Flask(__name__)
    Whisperr(app, client=client)

    @app.before_request
    def load_user() -> None:
        if request.headers.get("X-G-User"):
            g.user = {"id": request.headers["X-G-User"]}
        if request.headers.get("X-Request-User"):
            request.user = {"sub": request.headers["X-Request-User"]}  # type: ignore[attr-defined]

    @app.post("/t")
    def t() -> str:
        here().track("seen")
        return "ok"

    http = app.test_client()
    http.post("/t", headers={"X-G-User": "g-7"})
    http.post("/t", headers={"X-Request-User": "r-8"})
    http.post("/t", headers={"X-G-User": "g-9", "X-Request-User": "r-9"})  # g.user first
    http.post("/t")  # neither: nothing
    assert client.flush(timeout=10)
    assert [e["external_user_id"] for e in server.events] == ["g-7", "r-8", "g-9"]


def test_app_before_request_hooks_can_use_it(make_client: MakeClient, server: DevServer) -> None:
    client = make_client()
    app = Flask(__name__)

    @app.before_request
    def audit() -> None:  # registered before the extension, runs after its hook
        g.user = {"id": "early"}
        here().track("request_seen")

    Whisperr(app, client=client)
    app.add_url_rule("/", view_func=lambda: "ok")
    assert app.test_client().get("/").status_code == 200
    assert client.flush(timeout=10)
    assert [(e["external_user_id"], e["event_type"]) for e in server.events] == [
        ("early", "request_seen")
    ]


def test_resolve_user_callable_overrides_the_defaults(make_app: MakeApp, server: DevServer) -> None:
    seen: list[Any] = []

    def by_header(req: Any) -> Optional[str]:
        seen.append(req)
        return req.headers.get("X-Account")  # type: ignore[no-any-return]

    app = make_app(Whisperr(resolve_user=by_header))
    http = app.test_client()
    http.post("/login/u-1")  # Flask-Login's user is not used
    http.post("/track/with_header", headers={"X-Account": "acct-42"})
    http.post("/track/without_header")  # resolver returns None: nothing
    assert client_of(app).flush(timeout=10)
    assert [(e["external_user_id"], e["event_type"]) for e in server.events] == [
        ("acct-42", "with_header")
    ]
    assert seen and all(hasattr(r, "headers") and hasattr(r, "path") for r in seen)
    assert app.config["user_loads"] == 0


def test_resolve_user_dotted_path_from_config(
    make_app: MakeApp, server: DevServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "flask_resolvers.py").write_text(
        "def from_query(req):\n    return req.args.get('as')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    app = make_app(WHISPERR_RESOLVE_USER="flask_resolvers.from_query")
    http = app.test_client()
    http.post("/track/by_path?as=q-5")
    http.post("/track/by_path")
    assert client_of(app).flush(timeout=10)
    assert [e["external_user_id"] for e in server.events] == ["q-5"]


def test_resolve_user_argument_wins_over_config(make_app: MakeApp, server: DevServer) -> None:
    app = make_app(
        Whisperr(resolve_user=lambda req: "from-argument"),
        WHISPERR_RESOLVE_USER="no_such_module.resolver",
    )
    app.test_client().post("/track/x")
    assert client_of(app).flush(timeout=10)
    assert [e["external_user_id"] for e in server.events] == ["from-argument"]


def test_bad_resolver_path_fails_at_init(config: dict[str, Any], tmp_path: Path) -> None:
    with pytest.raises(ModuleNotFoundError):
        create_app({**config, "WHISPERR_RESOLVE_USER": "no_such_module.resolver"}, Whisperr())


def test_app_factory_gives_each_app_its_own_client(
    make_app: MakeApp, server: DevServer, tmp_path: Path
) -> None:
    ext = Whisperr()
    app_a = make_app(ext, WHISPERR_DB_PATH=str(tmp_path / "a.db"))
    app_b = make_app(ext, WHISPERR_DB_PATH=str(tmp_path / "b.db"))
    client_a, client_b = client_of(app_a), client_of(app_b)
    assert client_a is not client_b
    assert (client_a.path, client_b.path) == (str(tmp_path / "a.db"), str(tmp_path / "b.db"))
    with app_a.app_context():
        assert ext.client is client_a
    with app_b.app_context():
        assert ext.client is client_b

    for app, user in ((app_a, "u-1"), (app_b, "u-2"), (app_b, "u-3")):
        http = app.test_client()
        http.post(f"/login/{user}")
        http.post("/track/factory")
    assert (client_a.stats().pending, client_b.stats().pending) == (1, 2)

    assert client_a.flush(timeout=10)
    assert [e["external_user_id"] for e in server.events] == ["u-1"]
    assert client_b.flush(timeout=10)
    assert sorted(e["external_user_id"] for e in server.events) == ["u-1", "u-2", "u-3"]


def test_init_app_twice_on_one_app_is_refused(make_app: MakeApp) -> None:
    app = make_app()
    with pytest.raises(RuntimeError, match="already initialised"):
        Whisperr().init_app(app)


def test_config_names(
    make_app: MakeApp, server: DevServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("WHISPERR_API_KEY", raising=False)
    path = tmp_path / "configured.db"
    app = make_app(WHISPERR_DB_PATH=str(path), WHISPERR_APP_VERSION="4.2.0")
    client = client_of(app)
    assert client.path == str(path)
    http = app.test_client()
    http.post("/login/u-1")
    http.post("/track/configured")
    assert path.exists()
    assert client.flush(timeout=10)
    [event] = server.events
    assert event["context"]["app_version"] == "4.2.0"
    # WHISPERR_API_KEY reached the server (it accepts only conftest.API_KEY) ...
    assert server.requests[-1].headers.get("x-api-key") == API_KEY
    # ... and a wrong one does not get events accepted.
    other = make_app(WHISPERR_API_KEY="wrk_wrong", WHISPERR_DB_PATH=str(tmp_path / "w.db"))
    http = other.test_client()
    http.post("/login/u-1")
    http.post("/track/configured")
    assert not client_of(other).flush(timeout=10)
    assert len(server.events) == 1


def test_disabled_config_records_nothing(make_app: MakeApp, tmp_path: Path) -> None:
    path = tmp_path / "disabled.db"
    app = make_app(WHISPERR_DISABLED=True, WHISPERR_API_KEY=None, WHISPERR_DB_PATH=str(path))
    client = client_of(app)
    assert not client.ready
    http = app.test_client()
    http.post("/login/u-1")
    assert http.post("/track/ignored").status_code == 200
    assert client.flush(timeout=1)
    assert not path.exists()


def test_client_given_is_shared_and_used_outside_requests(
    make_client: MakeClient, server: DevServer
) -> None:
    client = make_client()
    ext = Whisperr(client=client)
    app_a, app_b = create_app({}, ext), create_app({}, ext)
    assert client_of(app_a) is client and client_of(app_b) is client
    assert ext.client is client  # outside any app context: the client given

    @app_a.cli.command("nightly")
    @click.argument("user_id")
    def nightly(user_id: str) -> None:
        current_client().track(user_id, "nightly_report_sent")

    result = app_a.test_cli_runner().invoke(args=["nightly", "u-9"])
    assert result.exit_code == 0, result.output
    assert client.flush(timeout=10)
    assert [(e["external_user_id"], e["event_type"]) for e in server.events] == [
        ("u-9", "nightly_report_sent")
    ]


def test_client_property_of_the_constructor_app(make_app: MakeApp, config: dict[str, Any]) -> None:
    app = create_app(config)
    ext = Whisperr(app)
    try:
        assert ext.client is app.extensions[EXTENSION_KEY].client  # no app context needed
    finally:
        ext.client.shutdown(timeout=0.5)


def test_no_client_outside_an_app_context() -> None:
    with pytest.raises(RuntimeError, match="app context"):
        current_client()
    with pytest.raises(RuntimeError, match="app context"):
        _ = Whisperr().client
    with Flask(__name__).app_context(), pytest.raises(RuntimeError, match="not initialised"):
        current_client()


def test_request_whisperr_is_the_lazy_helper(make_app: MakeApp) -> None:
    app = make_app()
    with app.test_request_context("/"):
        app.preprocess_request()
        helper = here()
        assert isinstance(helper, BoundWhisperr)
        assert helper.client is client_of(app)
        assert "unresolved" in repr(helper)
        assert helper.user_id is None


def test_used_after_its_request_binds_no_user(
    make_app: MakeApp, caplog: pytest.LogCaptureFixture
) -> None:
    app = make_app()
    kept: list[BoundWhisperr] = []

    @app.post("/keep")
    def keep() -> str:
        kept.append(here())
        return "ok"

    http = app.test_client()
    http.post("/login/u-1")
    http.post("/keep")
    with caplog.at_level("WARNING", logger="whisperr_durable"):
        kept[0].track("too_late")
    assert "outside its request" in caplog.text
    assert client_of(app).stats().pending == 0


def test_one_client_shared_by_server_threads(make_app: MakeApp, server: DevServer) -> None:
    app = make_app()
    httpd = make_server("127.0.0.1", 0, app, threaded=True)
    serving = threading.Thread(target=httpd.serve_forever, daemon=True)
    serving.start()
    base = f"http://127.0.0.1:{httpd.server_port}"
    per_user = 25
    failures: list[BaseException] = []
    start = threading.Barrier(len(USERS))

    def browse(user_id: str) -> None:
        try:
            with httpx.Client(base_url=base, timeout=10) as http:
                http.post(f"/login/{user_id}").raise_for_status()
                start.wait(10)
                for n in range(per_user):
                    answer = http.post(f"/track/threaded?n={n}")
                    answer.raise_for_status()
                    assert answer.text == user_id
        except BaseException as exc:
            failures.append(exc)

    try:
        threads = [threading.Thread(target=browse, args=(u,)) for u in USERS]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
    finally:
        httpd.shutdown()
        serving.join(10)
    assert not failures, failures

    assert client_of(app).flush(timeout=10)
    total = per_user * len(USERS)
    assert server.wait_for_events(total, timeout=10)
    got = sorted((e["external_user_id"], int(e["properties"]["n"])) for e in server.events)
    assert got == sorted((u, n) for u in USERS for n in range(per_user))


def test_importing_the_package_does_not_import_flask() -> None:
    code = (
        "import sys, whisperr_durable, whisperr_durable.integrations\n"
        "assert 'flask' not in sys.modules, 'flask imported'\n"
        "assert 'flask_login' not in sys.modules, 'flask_login imported'\n"
        "import whisperr_durable.integrations.flask\n"
        "assert 'flask' in sys.modules\n"
        "assert 'flask_login' not in sys.modules, 'flask_login imported by the extension'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


class AltIdUser(User):
    """A Flask-Login user known only by ``get_id()`` (no ``id``, ``pk``, ``sub`` ...)."""

    def __init__(self, alt_id: str) -> None:
        self.alt_id = alt_id

    def get_id(self) -> str:
        return self.alt_id


def test_flask_login_get_id_when_the_user_has_no_id_field(
    make_client: MakeClient, server: DevServer
) -> None:
    client = make_client()
    app = Flask(__name__)
    app.config["SECRET_KEY"] = "test-secret"
    login_manager = flask_login.LoginManager(app)
    login_manager.user_loader(AltIdUser)
    Whisperr(app, client=client)

    @app.post("/in")
    def log_in() -> str:
        flask_login.login_user(AltIdUser("alt-77"))
        return "ok"

    @app.post("/t")
    def t() -> str:
        here().track("by_get_id")
        return "ok"

    http = app.test_client()
    http.post("/in")
    http.post("/t")
    assert client.flush(timeout=10)
    assert [e["external_user_id"] for e in server.events] == ["alt-77"]


def test_flask_login_user_comes_before_g_user(make_app: MakeApp, server: DevServer) -> None:
    app = make_app()

    @app.before_request
    def set_g_user() -> None:
        g.user = {"id": "g-user"}

    http = app.test_client()
    http.post("/track/anonymous")  # Flask-Login's user is anonymous: g.user is next
    http.post("/login/u-1")
    http.post("/track/logged_in")
    assert client_of(app).flush(timeout=10)
    assert [(e["external_user_id"], e["event_type"]) for e in server.events] == [
        ("g-user", "anonymous"),
        ("u-1", "logged_in"),
    ]


class BrokenIdUser:
    """A user object whose ``id`` property raises (a lazy attribute whose query fails)."""

    is_authenticated = True

    @property
    def id(self) -> str:
        raise RuntimeError("session expired")


def test_a_default_lookup_that_raises_binds_no_user(
    make_client: MakeClient, server: DevServer, caplog: pytest.LogCaptureFixture
) -> None:
    client = make_client()
    app = Flask(__name__)
    app.config["SECRET_KEY"] = "test-secret"
    login_manager = flask_login.LoginManager(app)

    def load_user(user_id: str) -> Optional[User]:
        raise ConnectionError("user database is down")

    login_manager.user_loader(load_user)
    Whisperr(app, client=client)

    @app.before_request
    def app_users() -> None:
        if "X-G-User" in request.headers:
            g.user = {"id": request.headers["X-G-User"]}
        if "X-Broken-G-User" in request.headers:
            g.user = BrokenIdUser()
        if "X-Request-User" in request.headers:
            request.user = request.headers["X-Request-User"]  # type: ignore[attr-defined]

    @app.post("/in")
    def log_in() -> str:
        flask_login.login_user(USERS["u-1"])  # stores the id; later requests load it
        return "ok"

    @app.post("/t")
    def t() -> str:
        here().track("seen")
        return str(here().user_id)

    http = app.test_client()
    http.post("/in")
    with caplog.at_level("DEBUG", logger="whisperr_durable"):
        alone = http.post("/t")
        after_loader = http.post("/t", headers={"X-G-User": "g-1"})
        after_broken = http.post("/t", headers={"X-Broken-G-User": "1", "X-Request-User": "r-2"})
    assert (alone.status_code, alone.get_data(as_text=True)) == (200, "None")
    assert (after_loader.status_code, after_loader.get_data(as_text=True)) == (200, "g-1")
    assert (after_broken.status_code, after_broken.get_data(as_text=True)) == (200, "r-2")
    assert "user database is down" in caplog.text
    assert "session expired" in caplog.text
    assert client.flush(timeout=10)
    assert [e["external_user_id"] for e in server.events] == ["g-1", "r-2"]


def test_auth_objects_after_the_users(make_client: MakeClient, server: DevServer) -> None:
    client = make_client()
    app = Flask(__name__)
    Whisperr(app, client=client)

    @app.before_request
    def authenticate() -> None:
        if "X-G-Auth" in request.headers:
            g.auth = {"user_id": request.headers["X-G-Auth"], "scopes": ["read"]}
        if "X-Request-Auth" in request.headers:
            claims = SimpleNamespace(userId=request.headers["X-Request-Auth"])
            request.auth = claims  # type: ignore[attr-defined]
        if "X-G-User" in request.headers:
            g.user = {"id": request.headers["X-G-User"]}

    @app.post("/t")
    def t() -> str:
        here().track("seen")
        return "ok"

    http = app.test_client()
    http.post("/t", headers={"X-G-Auth": "ga-1"})
    http.post("/t", headers={"X-Request-Auth": "ra-2"})
    http.post("/t", headers={"X-G-Auth": "ga-3", "X-Request-Auth": "ra-3"})  # g.auth first
    http.post("/t", headers={"X-G-Auth": "ga-4", "X-G-User": "gu-4"})  # a user wins
    assert client.flush(timeout=10)
    assert [e["external_user_id"] for e in server.events] == ["ga-1", "ra-2", "ga-3", "gu-4"]


def test_user_id_can_be_set_during_the_request(make_app: MakeApp, server: DevServer) -> None:
    app = make_app()

    @app.post("/signup")
    def signup() -> str:
        here().track("before_signup")  # no user yet: nothing
        here().user_id = "u_123"
        here().track("signed_up")
        return str(here().user_id)

    @app.post("/as-object")
    def as_object() -> str:
        here().user_id = {"id": 77}
        here().track("bound_to_object")
        here().user_id = None
        here().track("looked_up_again")  # Flask-Login's user
        return "ok"

    http = app.test_client()
    assert http.post("/signup").get_data(as_text=True) == "u_123"
    http.post("/login/u-2")
    assert http.post("/as-object").status_code == 200
    assert client_of(app).flush(timeout=10)
    assert [(e["external_user_id"], e["event_type"]) for e in server.events] == [
        ("u_123", "signed_up"),
        ("77", "bound_to_object"),
        ("u-2", "looked_up_again"),
    ]
