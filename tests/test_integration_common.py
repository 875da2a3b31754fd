"""What every framework integration shares: user resolution, the bound helper, settings."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Optional

import pytest
from conftest import API_KEY, MakeClient, as_unprivileged, run_forked

from whisperr_durable.devserver import DevServer
from whisperr_durable.integrations import BoundWhisperr, client_from_settings, resolve_user_id
from whisperr_durable.integrations._common import first_user_id, import_resolver, resolver_user_id


@pytest.mark.parametrize(
    ("user", "expected"),
    [
        (SimpleNamespace(id=42), "42"),
        (SimpleNamespace(pk="u-7"), "u-7"),
        (SimpleNamespace(sub="auth0|abc"), "auth0|abc"),
        ({"user_id": 9}, "9"),
        ({"userId": "camel"}, "camel"),
        (SimpleNamespace(id=None, pk=5), "5"),  # the first field that holds a value
        ("  user_8842 ", "user_8842"),
        (1234, "1234"),
        (SimpleNamespace(id=3, is_authenticated=False), None),  # anonymous
        (SimpleNamespace(id=3, is_authenticated=True), "3"),
        (SimpleNamespace(name="no id here"), None),
        ({"id": ""}, None),
        (True, None),
        ("", None),
        (None, None),
    ],
)
def test_default_user_resolution_from_common_auth_shapes(
    user: Any, expected: Optional[str]
) -> None:
    assert resolve_user_id(user) == expected


def resolve_from_header(request: Any) -> Optional[str]:
    return str(request.headers.get("X-User") or "") or None


def test_a_resolver_by_dotted_path_or_callable() -> None:
    assert import_resolver(f"{__name__}.resolve_from_header") is resolve_from_header
    assert import_resolver(resolve_from_header) is resolve_from_header
    assert import_resolver(None) is None
    with pytest.raises(ValueError):
        import_resolver("no_module_path")


def test_a_resolver_that_raises_names_no_user() -> None:
    request = SimpleNamespace(headers={"X-User": "from-header"})
    assert resolver_user_id(resolve_from_header, request) == "from-header"

    def broken(request: Any) -> Optional[str]:
        raise RuntimeError("auth backend down")

    assert resolver_user_id(broken, request) is None


def test_the_user_is_looked_up_on_first_use_until_one_is_found(
    make_client: MakeClient, server: DevServer
) -> None:
    client = make_client()
    looks: list[Optional[str]] = [None, "late_login", "never asked"]
    calls: list[int] = []

    def lookup() -> Optional[str]:
        calls.append(1)
        return looks[len(calls) - 1]

    lazy = BoundWhisperr(client, lookup=lookup)
    assert calls == []  # nothing looked up before it is used
    lazy.track("before_login")  # no user yet: skipped
    lazy.track("after_login")
    lazy.track("again")
    assert len(calls) == 2  # found on the second look, then kept
    lazy.user_id = None  # looks again
    lazy.user_id = SimpleNamespace(id=7)  # or binds outright
    lazy.track("bound_outright")
    assert client.flush(timeout=10).pending == 0
    assert [(e["external_user_id"], e["event_type"]) for e in server.events] == [
        ("late_login", "after_login"),
        ("late_login", "again"),
        ("7", "bound_outright"),
    ]


def test_without_a_user_nothing_is_stored_and_debug_says_so(
    make_client: MakeClient, server: DevServer, caplog: pytest.LogCaptureFixture
) -> None:
    client = make_client()
    anonymous = BoundWhisperr(client, None)
    with caplog.at_level(logging.DEBUG, logger="whisperr_durable"):
        anonymous.track("page_viewed")
        anonymous.identify(traits={"plan": "pro"})
    assert client.stats().pending == 0
    assert any(
        "no user" in r.getMessage() and "page_viewed" in r.getMessage() for r in caplog.records
    )

    known = BoundWhisperr(client, "user_8842")
    known.track("plan_upgraded", {"plan": "pro"})
    known.identify(traits={"plan": "pro"})
    assert client.flush(timeout=10).pending == 0
    assert [(e["external_user_id"], e["event_type"]) for e in server.events] == [
        ("user_8842", "plan_upgraded")
    ]
    assert [i["external_user_id"] for i in server.identifies] == ["user_8842"]


def test_client_from_settings_reads_a_mapping_or_an_object(
    server: DevServer, tmp_path: Any
) -> None:
    mapping = {
        "WHISPERR_API_KEY": API_KEY,
        "WHISPERR_BASE_URL": server.url,
        "WHISPERR_DB_PATH": str(tmp_path / "a.db"),
        "WHISPERR_MAX_QUEUE_SIZE": 5,
        "WHISPERR_APP_VERSION": "9.9.9",
    }
    a = client_from_settings(mapping)
    b = client_from_settings(
        SimpleNamespace(**{**mapping, "WHISPERR_DB_PATH": str(tmp_path / "b.db")})
    )
    try:
        assert a.path == str(tmp_path / "a.db")
        assert b.path == str(tmp_path / "b.db")
        for _ in range(7):
            a.track("u1", "bounded")
        assert a.stats().pending == 5  # WHISPERR_MAX_QUEUE_SIZE took effect
        b.track("u1", "versioned")
        assert b.flush(timeout=10).pending == 0
        assert server.events[-1]["context"]["app_version"] == "9.9.9"
        disabled = client_from_settings({"WHISPERR_DISABLED": True})
        assert disabled.ready is False
    finally:
        a.shutdown(timeout=0.5)
        b.shutdown(timeout=0.5)


def test_a_uuid_from_a_resolver_is_the_id_itself() -> None:
    import uuid

    key = uuid.UUID("12345678-1234-5678-1234-567812345678")
    assert resolve_user_id(key) == "12345678-1234-5678-1234-567812345678"
    assert resolve_user_id(SimpleNamespace(pk=key)) == "12345678-1234-5678-1234-567812345678"


def test_an_async_resolver_is_refused_up_front() -> None:
    async def resolve(request: Any) -> Optional[str]:
        return "never awaited"

    class AsyncCallable:
        async def __call__(self, request: Any) -> Optional[str]:
            return "never awaited"

    with pytest.raises(TypeError, match="not async"):
        import_resolver(resolve)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="not async"):
        import_resolver(AsyncCallable())  # type: ignore[arg-type]


def test_a_user_whose_id_property_raises_is_no_user() -> None:
    class Broken:
        is_authenticated = True

        @property
        def id(self) -> str:
            raise RuntimeError("session store down")

    def down() -> Any:
        raise RuntimeError("session store down")

    assert first_user_id(Broken, lambda: {"sub": "fallback"}) == "fallback"
    assert first_user_id(down, lambda: None, lambda: 42) == "42"
    assert first_user_id(Broken) is None


def on_error_sink(error: Any) -> None:
    ERRORS.append(error)


ERRORS: list[Any] = []


def test_strict_and_a_dotted_on_error_from_settings(server: DevServer, tmp_path: Any) -> None:
    client = client_from_settings(
        {
            "WHISPERR_API_KEY": API_KEY,
            "WHISPERR_BASE_URL": server.url,
            "WHISPERR_DB_PATH": str(tmp_path / "s.db"),
            "WHISPERR_STRICT": True,
            "WHISPERR_ON_ERROR": f"{__name__}.on_error_sink",
            "WHISPERR_MAX_QUEUE_SIZE": 1,
        }
    )
    try:
        with pytest.raises(ValueError):
            client.track("", "no_user_id")  # strict: an invalid call raises
        client.track("u1", "first")
        client.track("u1", "second")  # evicts the first: reported to on_error
        assert [e.type for e in ERRORS] == ["dropped"]
    finally:
        ERRORS.clear()
        client.shutdown(timeout=0.5)


def test_settings_given_as_text_take_the_options_types(tmp_path: Any) -> None:
    client = client_from_settings(
        {
            "WHISPERR_API_KEY": API_KEY,
            "WHISPERR_DB_PATH": str(tmp_path / "t.db"),
            "WHISPERR_DISABLED": "false",
            "WHISPERR_FSYNC": "0",
            "WHISPERR_FLUSH_AT": " 7 ",
            "WHISPERR_FLUSH_INTERVAL": "2.5",
            "WHISPERR_MAX_QUEUE_SIZE": "3",
        }
    )
    try:
        assert client.ready
        assert (client._options.fsync, client._options.flush_at) == (False, 7)
        assert client._options.flush_interval == 2.5
        for _ in range(5):
            client.track("u1", "bounded")
        assert client.stats().pending == 3
    finally:
        client.shutdown(timeout=0.5)
    assert client_from_settings({"WHISPERR_DISABLED": "yes"}).ready is False
    with pytest.raises(ValueError, match="WHISPERR_FLUSH_AT"):
        client_from_settings({"WHISPERR_API_KEY": API_KEY, "WHISPERR_FLUSH_AT": "many"})


def test_an_outbox_path_this_process_cannot_write_fails_at_startup_naming_who_owns_it(
    world_readable_dir: Path,
) -> None:
    # The app runs as another user than the one who made its state directory (a root cron
    # job made it, say): 0755, not writable for the app.
    path = world_readable_dir / "o.db"
    if os.geteuid() != 0:
        os.chmod(world_readable_dir, 0o555)
    settings = {"WHISPERR_API_KEY": "wrk_test_key", "WHISPERR_DB_PATH": str(path)}

    def child() -> int:
        if os.access(world_readable_dir, os.W_OK):
            return 3  # cannot set up: this user writes the directory
        try:
            client_from_settings(settings)
        except ValueError as exc:
            message = str(exc)
            named = str(path) in message and "runs as" in message and "belongs to" in message
            return 0 if named else 2
        return 1

    code = run_forked(as_unprivileged(child))
    if code == 3:
        pytest.skip("could not make the directory read-only for this process")
    assert code == 0, {1: "no error at startup", 2: "the error names no path or owner"}[code]
    assert not path.exists()  # nothing made
