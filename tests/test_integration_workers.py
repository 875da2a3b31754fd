"""Worker processes: a real Celery prefork worker, RQ's work-horse model, a multiprocessing pool.

Pool children end with ``os._exit`` (billiard's and multiprocessing's), which runs no atexit
handler: what a child tracked and did not deliver stays in the outbox until a process runs
a sender on that file. These tests run the recipes the README gives for that.
"""

from __future__ import annotations

import functools
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from multiprocessing.util import Finalize
from pathlib import Path
from typing import Any, Callable, Optional

import pytest
from conftest import API_KEY, MakeClient, run_forked

from whisperr_durable import DurableWhisperr
from whisperr_durable.devserver import DevServer
from whisperr_durable.integrations.serverless import flush_before_return

pytestmark = pytest.mark.slow  # subprocesses: dev.py test --quick leaves them out

# ---- Celery: a real worker, prefork pool, filesystem broker (no server to run) ----

# The module a worker imports (-A tasks); it reads its settings from config.json beside it.
# CLIENT_AT "import": the client is made when the worker's main process imports this module,
# before the pool forks; "process_init": each pool child makes its own.
TASKS_MODULE = """
import json
import logging
import os
import sys
from pathlib import Path

from celery import Celery, signals

from whisperr_durable import Whisperr

HERE = Path(__file__).parent
CONFIG = json.loads((HERE / "config.json").read_text())

problems = logging.StreamHandler(sys.__stderr__)
problems.setFormatter(logging.Formatter("WHISPERR-PROBLEM %(levelname)s %(message)s"))
problems.setLevel(logging.WARNING)
logging.getLogger("whisperr_durable").addHandler(problems)

app = Celery("tasks")
app.conf.update(CONFIG["celery"])


def make_client():
    return Whisperr(
        CONFIG["api_key"],
        path=CONFIG["db"],
        base_url=CONFIG["url"],
        flush_at=100_000,  # nothing is sent before a flush: shows who delivers
        flush_interval=3600,
        on_error=lambda e: print("WHISPERR-PROBLEM on_error", e.type, e.message,
                                 file=sys.__stderr__, flush=True),
    )


client = make_client() if CONFIG["client_at"] == "import" else None


@signals.worker_process_init.connect
def make_client_in_child(**kwargs):
    global client
    if client is None:
        client = make_client()
    with open(HERE / "children.txt", "a") as out:
        out.write(f"{os.getpid()}\\n")


if CONFIG["flush_hook"]:
    @signals.worker_process_shutdown.connect
    def flush_whisperr(pid=None, exitcode=None, **kwargs):
        result = client.flush(timeout=10)
        with open(HERE / "flushes.jsonl", "a") as out:
            out.write(json.dumps({"pid": os.getpid(), "ok": result.ok,
                                  "pending": result.pending}) + "\\n")


@app.task(name="tasks.work")
def work(i):
    client.track(f"user_{i % 3}", "task_done", {"i": i})
    return os.getpid()
"""


def celery_conf(tmp_path: Path) -> dict[str, Any]:
    broker = tmp_path / "broker"
    for name in ("queue", "processed", "control"):
        (broker / name).mkdir(parents=True, exist_ok=True)
    (tmp_path / "results").mkdir(exist_ok=True)
    return {
        "broker_url": "filesystem://",
        "broker_transport_options": {
            "data_folder_in": str(broker / "queue"),
            "data_folder_out": str(broker / "queue"),
            "processed_folder": str(broker / "processed"),
            "control_folder": str(broker / "control"),
        },
        "broker_connection_retry_on_startup": True,
        "result_backend": f"file://{tmp_path / 'results'}",
        "worker_hijack_root_logger": False,
    }


class CeleryWorker:
    """``celery -A tasks worker -P prefork -c 2`` in a subprocess, and a producer for it."""

    def __init__(
        self, tmp_path: Path, server: DevServer, db_path: str, *, client_at: str, flush_hook: bool
    ) -> None:
        from celery import Celery

        self.dir = tmp_path / "app"
        self.dir.mkdir()
        conf = celery_conf(tmp_path)
        config = {
            "api_key": API_KEY,
            "db": db_path,
            "url": server.url,
            "client_at": client_at,
            "flush_hook": flush_hook,
            "celery": conf,
        }
        (self.dir / "config.json").write_text(json.dumps(config))
        (self.dir / "tasks.py").write_text(textwrap.dedent(TASKS_MODULE))
        self.log_path = tmp_path / "worker.log"
        self.producer = Celery("producer")
        self.producer.conf.update(conf)
        self.proc: Optional[subprocess.Popen[bytes]] = None

    def start(self) -> None:
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "celery",
                    "-A",
                    "tasks",
                    "worker",
                    "-P",
                    "prefork",
                    "-c",
                    "2",
                    "--loglevel=INFO",
                    "--without-gossip",
                    "--without-mingle",
                    "--without-heartbeat",
                ],
                cwd=self.dir,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        # Both pool children are ready (their clients made) before any task runs: a client
        # made later would find the others' ops in the file and deliver them at once.
        children = self.dir / "children.txt"
        deadline = time.monotonic() + 30
        while not (children.exists() and len(children.read_text().split()) >= 2):
            assert time.monotonic() < deadline, self.log()
            assert self.proc.poll() is None, self.log()
            time.sleep(0.05)

    def run_tasks(self, n: int) -> list[int]:
        """Send ``n`` tasks and wait for their results: the pids that ran them."""
        results = [self.producer.send_task("tasks.work", args=(i,)) for i in range(n)]
        return [int(r.get(timeout=30)) for r in results]

    def stop(self) -> int:
        """Warm shutdown (SIGTERM), as a process manager stops a worker."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(30)

    def kill(self) -> None:
        """Cleanup: whatever state the test left the worker in."""
        self.producer.close()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def flushes(self) -> list[dict[str, Any]]:
        path = self.dir / "flushes.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines()]


def task_indexes(server: DevServer) -> Counter[int]:
    return Counter(e["properties"]["i"] for e in server.events if e["event_type"] == "task_done")


def test_celery_prefork_worker_flushes_on_worker_process_shutdown(
    tmp_path: Path, server: DevServer, db_path: str, make_client: MakeClient
) -> None:
    pytest.importorskip("celery")
    worker = CeleryWorker(tmp_path, server, db_path, client_at="import", flush_hook=True)
    n = 40
    worker.start()
    try:
        pids = worker.run_tasks(n)
        assert worker.proc is not None and worker.proc.pid not in pids  # ran in pool children
        assert server.events == []  # flush_at is huge: nothing is sent before the flush
        assert worker.stop() == 0, worker.log()
    finally:
        worker.kill()
    log = worker.log()
    assert "WHISPERR-PROBLEM" not in log and "Traceback" not in log, log

    # Each pool child flushed on its way out; together they delivered every event once.
    flushes = worker.flushes()
    assert len(flushes) == 2 and all(f["ok"] and f["pending"] == 0 for f in flushes), flushes
    assert set(pids) <= {f["pid"] for f in flushes}
    assert task_indexes(server) == Counter(range(n))
    assert len(server.message_ids) == n and server.duplicates == 0
    assert make_client().stats().pending == 0


def test_celery_children_that_exit_without_a_flush_leave_their_events_for_the_next_sender(
    tmp_path: Path, server: DevServer, db_path: str, make_client: MakeClient
) -> None:
    pytest.importorskip("celery")
    # No hook, and no client in the worker's main process: nothing runs a sender at exit.
    worker = CeleryWorker(tmp_path, server, db_path, client_at="process_init", flush_hook=False)
    n = 20
    worker.start()
    try:
        worker.run_tasks(n)
        assert worker.stop() == 0, worker.log()
    finally:
        worker.kill()
    log = worker.log()
    assert "WHISPERR-PROBLEM" not in log and "Traceback" not in log, log

    # The children ended with os._exit: no atexit flush ran, and nothing was lost either.
    assert server.events == []
    assert worker.flushes() == []
    client = make_client()  # the next process on the file: a restarted worker, a cron job
    assert client.stats().pending == n
    assert client.flush(10)
    assert task_indexes(server) == Counter(range(n))
    assert len(server.message_ids) == n and server.duplicates == 0
    assert client.stats().pending == 0


# ---- multiprocessing (fork): a client made before the pool ----

_pool_client: Optional[DurableWhisperr] = None


def _flush_at_worker_exit() -> None:
    """Pool initializer: flush when the worker ends normally (close() + join()).

    multiprocessing runs its finalizers as a worker ends, before its os._exit; atexit
    handlers never run there.
    """
    assert _pool_client is not None
    Finalize(None, _pool_client.flush, args=(10.0,), exitpriority=10)


def _pool_task(i: int) -> int:
    assert _pool_client is not None
    _pool_client.track(f"user_{i % 4}", "pool_task", {"i": i})
    return os.getpid()


def pool_indexes(server: DevServer) -> Counter[int]:
    return Counter(e["properties"]["i"] for e in server.events if e["event_type"] == "pool_task")


@pytest.fixture
def pool_client(make_client: MakeClient) -> Any:
    global _pool_client
    _pool_client = make_client()
    yield _pool_client
    _pool_client = None


def test_multiprocessing_workers_flush_in_a_finalizer_when_the_pool_closes(
    server: DevServer, pool_client: DurableWhisperr
) -> None:
    n = 30
    pool = multiprocessing.get_context("fork").Pool(2, initializer=_flush_at_worker_exit)
    pids = pool.map(_pool_task, range(n), chunksize=1)
    pool.close()
    pool.join()
    assert os.getpid() not in pids
    # Delivered by the workers' own flushes: the parent has not flushed.
    assert pool_indexes(server) == Counter(range(n))
    assert server.duplicates == 0
    assert pool_client.stats().pending == 0


def test_a_terminated_pool_leaves_its_events_on_disk_for_the_parents_flush(
    server: DevServer, pool_client: DurableWhisperr
) -> None:
    n = 30
    # No flush in the workers, and Pool.__exit__ calls terminate() (SIGTERM): what they
    # tracked is committed to the file, and only there.
    with multiprocessing.get_context("fork").Pool(2) as pool:
        pool.map(_pool_task, range(n), chunksize=1)
    assert server.events == []
    assert pool_client.stats().pending == n
    assert pool_client.flush(10)
    assert pool_indexes(server) == Counter(range(n))
    assert len(server.message_ids) == n and server.duplicates == 0


# ---- RQ: a forked work-horse per job, ended with os._exit(0) ----
#
# RQ needs Redis, so its model is reproduced here: the worker process imports the app (which
# makes the client), then for each job forks a work-horse that runs the job function and
# ends with os._exit(0), which runs no atexit handler; the worker waits for it.
# run_forked() is that fork, os._exit and wait, with a timeout.


def rq_indexes(server: DevServer) -> Counter[int]:
    return Counter(e["properties"]["job"] for e in server.events if e["event_type"] == "rq_job")


def _work_horse(job: Callable[[int], None], i: int) -> int:
    job(i)
    return 0  # run_forked ends the child with os._exit(0), as RQ's work-horse does


def run_work_horses(
    job: Callable[[int], None], n: int, after_each: Optional[Callable[[int], None]] = None
) -> None:
    """Run ``job(i)`` for i in range(n), each in its own forked work-horse, one at a time."""
    for i in range(n):
        assert run_forked(functools.partial(_work_horse, job, i)) == 0, f"job {i} failed"
        if after_each is not None:
            after_each(i)


def test_rq_work_horses_deliver_their_events_with_flush_before_return(
    server: DevServer, make_client: MakeClient
) -> None:
    client = make_client()  # the worker process imported the app: one client, before any fork

    @flush_before_return(client, timeout=10.0)
    def export_report(job: int) -> None:
        client.track(f"user_{job}", "rq_job", {"job": job, "part": 1})
        client.track(f"user_{job}", "rq_job", {"job": job, "part": 2})

    def delivered_by_the_horse(job: int) -> None:
        # The work-horse is gone and the worker has flushed nothing: its events are there.
        assert rq_indexes(server)[job] == 2, server.events

    n = 4
    run_work_horses(export_report, n, delivered_by_the_horse)
    assert rq_indexes(server) == Counter({job: 2 for job in range(n)})
    assert len(server.message_ids) == 2 * n and server.duplicates == 0
    assert client.stats().pending == 0


def test_rq_work_horses_without_a_flush_leave_their_events_for_the_workers_flush(
    server: DevServer, make_client: MakeClient
) -> None:
    client = make_client()

    def export_report(job: int) -> None:
        client.track(f"user_{job}", "rq_job", {"job": job})

    n = 4
    run_work_horses(export_report, n)
    # os._exit(0) ran no exit flush: every event is in the file, none at the server.
    assert server.events == []
    assert client.stats().pending == n
    assert client.flush(10)
    assert rq_indexes(server) == Counter(range(n))
    assert len(server.message_ids) == n and server.duplicates == 0
    assert client.stats().pending == 0


# ---- importing the package loads no framework ----

FRAMEWORKS = ("django", "flask", "flask_login", "starlette", "fastapi", "celery", "psycopg")


def test_importing_the_package_and_the_serverless_module_loads_no_framework() -> None:
    code = (
        "import sys\n"
        "import whisperr_durable\n"
        "import whisperr_durable.integrations\n"
        "import whisperr_durable.integrations.serverless\n"
        f"banned = {FRAMEWORKS!r}\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & set(banned)))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
