#!/usr/bin/env python3
"""Set up a local virtual environment and run the project's jobs.

    python3 scripts/dev.py demo    # the end-to-end demo (temp outbox + local server)
    python3 scripts/dev.py test    # ruff, mypy and the whole pytest suite
    python3 scripts/dev.py test --quick   # the same without the slow (multi-process) tests

Needs only Python 3.9+: the first run creates ``.venv`` and installs the package with its
development tools (the ``dev`` dependency group); later runs reinstall only when
``pyproject.toml`` changes. ``test`` runs the PostgreSQL store's tests against a throwaway
server of its own where this machine has PostgreSQL (``scripts/postgres.py``), or against
``$WHISPERR_TEST_POSTGRES`` (a URL) if set; without either, they are skipped.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PY = BIN / ("python.exe" if os.name == "nt" else "python")
STAMP = VENV / ".installed"


def _run(*cmd: str) -> int:
    print("+", " ".join(cmd), flush=True)
    return subprocess.call(cmd, cwd=ROOT)


def ensure_venv() -> None:
    wanted = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if STAMP.exists() and STAMP.read_text() == wanted and PY.exists():
        return
    if not PY.exists():
        print(f"+ creating {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True, clear=True).create(VENV)
    pip = [str(PY), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    # pip reads [dependency-groups] (the development tools) from 25.1 on.
    if _run(*pip, "--upgrade", "pip>=25.1") != 0 or _run(*pip, "-e", ".", "--group", "dev") != 0:
        sys.exit("installing the project into .venv failed")
    STAMP.write_text(wanted)


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("demo", "test"):
        print(__doc__)
        return 2
    ensure_venv()
    job, rest = argv[0], argv[1:]
    if job == "demo":
        return _run(str(PY), "-m", "whisperr_durable", "demo", *rest)
    for step in (
        [str(PY), "-m", "ruff", "check", "."],
        [str(PY), "-m", "mypy"],
    ):
        if _run(*step) != 0:
            return 1
    if "--quick" in rest:  # the inner loop: no tests marked slow
        rest = [arg for arg in rest if arg != "--quick"] + ["-m", "not slow"]
    if os.environ.get("WHISPERR_TEST_POSTGRES"):  # a server of your own
        return _run(str(PY), "-m", "pytest", *rest)
    sys.path.insert(0, str(ROOT / "scripts"))
    from postgres import throwaway_server

    with throwaway_server() as server:
        if server is None:
            print("+ no PostgreSQL on this machine: its tests will be skipped", flush=True)
        else:
            print(f"+ a throwaway PostgreSQL for the tests at {server.url}", flush=True)
            os.environ["WHISPERR_TEST_POSTGRES"] = server.url
            os.environ["WHISPERR_TEST_POSTGRES_CTL"] = server.describe()
        return _run(str(PY), "-m", "pytest", *rest)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
