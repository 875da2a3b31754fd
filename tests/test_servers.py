"""Real web servers that end with SIGTERM, as ``docker stop``, systemd and Kubernetes do.

uvicorn ends a process by raising SIGTERM again after its graceful shutdown, so no exit
handler runs: what an app tracked goes only if the ASGI lifespan's shutdown delivers it
(FastAPI with the middleware, Django's ASGI application through ``asgi_application()``).
Under ``gunicorn --preload`` the master imports the app but serves nothing: it must not
open the outbox, whose exit flush would come after the workers'. Every app here keeps
what it tracks on disk until then (``flush_at`` and ``flush_interval`` never come).
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import API_KEY, LineLog, child_env, free_port, queue_table, raw

from whisperr_durable.devserver import DevServer

pytestmark = pytest.mark.slow  # real servers in subprocesses

REQUESTS = 12

FASTAPI_APP = """
from fastapi import FastAPI, Request

from whisperr_durable.integrations.asgi import WhisperrMiddleware

app = FastAPI()
app.add_middleware(WhisperrMiddleware)  # its client from the WHISPERR_* variables


@app.get("/track/{i}")
def track(i: int, request: Request) -> dict[str, int]:
    request.state.whisperr.user_id = "user_s"
    request.state.whisperr.track("server_event", {"i": i})
    return {"pid": __import__("os").getpid()}
"""

DJANGO_APP = """
import os

import django
from django.conf import settings
from django.http import HttpResponse
from django.urls import path

settings.configure(
    DEBUG=False,
    ALLOWED_HOSTS=["127.0.0.1"],
    ROOT_URLCONF=__name__,
    SECRET_KEY="not-a-secret",
    INSTALLED_APPS=[],
    MIDDLEWARE=["whisperr_durable.integrations.django.WhisperrMiddleware"],
    WHISPERR_API_KEY=os.environ["APP_API_KEY"],
    WHISPERR_DB_PATH=os.environ["APP_DB_PATH"],
    WHISPERR_BASE_URL=os.environ["APP_BASE_URL"],
    WHISPERR_FLUSH_AT=100_000,
    WHISPERR_FLUSH_INTERVAL=3600.0,
    WHISPERR_SHUTDOWN_TIMEOUT=float(os.environ["APP_SHUTDOWN_TIMEOUT"]),
)
django.setup()


def track(request, i):
    request.whisperr.user_id = "user_s"
    request.whisperr.track("server_event", {"i": i})
    return HttpResponse(str(os.getpid()))


urlpatterns = [path("track/<int:i>", track)]

from django.core.wsgi import get_wsgi_application  # noqa: E402

from whisperr_durable.integrations.django import asgi_application  # noqa: E402

application = asgi_application()
wsgi = get_wsgi_application()
"""


@pytest.fixture
def app_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "app"
    directory.mkdir()
    (directory / "fastapi_app.py").write_text(textwrap.dedent(FASTAPI_APP))
    (directory / "django_app.py").write_text(textwrap.dedent(DJANGO_APP))
    return directory


def app_env(url: str, db_path: str, shutdown_timeout: float = 5.0) -> dict[str, str]:
    """The apps' settings: FastAPI's from WHISPERR_* variables, Django's from APP_* ones."""
    return child_env(
        WHISPERR_API_KEY=API_KEY,
        WHISPERR_DB_PATH=db_path,
        WHISPERR_BASE_URL=url,
        WHISPERR_FLUSH_AT="100000",
        WHISPERR_FLUSH_INTERVAL="3600",
        APP_API_KEY=API_KEY,
        APP_DB_PATH=db_path,
        APP_BASE_URL=url,
        APP_SHUTDOWN_TIMEOUT=str(shutdown_timeout),
    )


class Served:
    """A server process, its log, and where it listens."""

    def __init__(self, args: list[str], env: dict[str, str], ready: str, port: int) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", *args],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.process.stderr is not None
        self.log = LineLog(self.process.stderr)
        self.url = f"http://127.0.0.1:{port}"
        assert self.log.wait_for(ready), self.log.text(0)

    def get_all(self, n: int) -> list[str]:
        with httpx.Client(base_url=self.url, timeout=10) as http:
            responses = [http.get(f"/track/{i}") for i in range(n)]
        assert [r.status_code for r in responses] == [200] * n, [r.text for r in responses]
        return [r.text for r in responses]

    def terminate(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(30)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


@pytest.fixture
def served() -> Iterator[list[Served]]:
    started: list[Served] = []
    yield started
    for s in started:
        s.close()


def queued(db_path: str) -> int:
    ((count,),) = raw(db_path, f"SELECT count(*) FROM {queue_table()}")
    return int(count)


def delivered(server: DevServer) -> list[int]:
    return sorted(e["properties"]["i"] for e in server.events)


@pytest.mark.parametrize("app", ["fastapi_app:app", "django_app:application"])
def test_uvicorn_ended_by_sigterm_delivers_what_the_app_tracked(
    app: str,
    app_dir: Path,
    server: DevServer,
    db_path: str,
    served: list[Served],
) -> None:
    port = free_port()
    uvicorn = Served(
        ["uvicorn", app, f"--app-dir={app_dir}", f"--port={port}", "--lifespan=on"],
        app_env(server.url, db_path),
        "Application startup complete",
        port,
    )
    served.append(uvicorn)
    uvicorn.get_all(REQUESTS)
    assert server.events == [] and queued(db_path) == REQUESTS  # on disk, not yet sent
    # uvicorn's graceful shutdown, then the signal again: the exit handlers never run.
    assert uvicorn.terminate() == -signal.SIGTERM
    text = uvicorn.log.text()
    assert "Traceback" not in text and "WARNING" not in text, text
    assert delivered(server) == list(range(REQUESTS))
    assert queued(db_path) == 0


def gunicorn_preload(app_dir: Path, env: dict[str, str]) -> Served:
    port = free_port()
    return Served(
        [
            "gunicorn",
            "--preload",
            "--workers=2",
            f"--bind=127.0.0.1:{port}",
            f"--chdir={app_dir}",
            "django_app:wsgi",
        ],
        env,
        "Booting worker",
        port,
    )


def test_gunicorn_preload_workers_deliver_at_sigterm(
    app_dir: Path, server: DevServer, db_path: str, served: list[Served]
) -> None:
    gunicorn = gunicorn_preload(app_dir, app_env(server.url, db_path))
    served.append(gunicorn)
    pids = gunicorn.get_all(REQUESTS)
    assert str(gunicorn.process.pid) not in pids  # the workers served every request
    # (A worker whose client is made after another worker's ops are in the file delivers
    # those at once: what is still queued here depends on the order of the requests.)
    assert gunicorn.terminate() == 0  # gunicorn's workers exit normally: atexit runs
    text = gunicorn.log.text()
    assert "Traceback" not in text and "WARNING" not in text, text
    assert delivered(server) == list(range(REQUESTS))
    assert queued(db_path) == 0


def test_gunicorn_preload_against_a_hanging_api_stops_within_one_shutdown_timeout(
    app_dir: Path, db_path: str, served: list[Served]
) -> None:
    # The master imports the app and builds Django's middleware, but makes no client: a
    # client there would flush again at its exit, after the workers' flushes had used up
    # their budget, and double the time SIGTERM takes (Docker kills at 10 s).
    budget = 3.0
    with socket.socket() as hanging:  # takes connections into its backlog, never answers
        hanging.bind(("127.0.0.1", 0))
        hanging.listen(64)
        url = f"http://127.0.0.1:{hanging.getsockname()[1]}"
        gunicorn = gunicorn_preload(app_dir, app_env(url, db_path, shutdown_timeout=budget))
        served.append(gunicorn)
        gunicorn.get_all(REQUESTS)
        started = time.monotonic()
        assert gunicorn.terminate() == 0
        took = time.monotonic() - started
    assert budget <= took < budget + 2.0, took  # the workers' flushes, side by side, alone
    assert "Traceback" not in gunicorn.log.text()
    assert queued(db_path) == REQUESTS  # nothing lost: left for the next process
