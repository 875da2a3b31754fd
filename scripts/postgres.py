"""A throwaway PostgreSQL server for the tests: its own cluster in a temporary directory,
on a free port of 127.0.0.1, gone when the tests end.

    with throwaway_server() as server:   # None if this machine has no PostgreSQL
        os.environ["WHISPERR_TEST_POSTGRES"] = server.url

``initdb`` and ``postgres`` refuse to run as root: run as root, they run as the
``postgres`` user (Debian's packages make it), in a directory that user owns.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Optional


def find_bin() -> Optional[Path]:
    """The directory of ``initdb``, ``postgres`` and ``pg_ctl``: on PATH, or Debian's."""
    found = shutil.which("pg_ctl")
    if found:
        return Path(os.path.realpath(found)).parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=_version)
    return Path(versions[-1]).parent if versions else None


def _version(path: str) -> float:
    try:
        return float(Path(path).parts[-3])
    except ValueError:
        return 0.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


class Server:
    """A running throwaway cluster: where it listens and how to control it."""

    def __init__(self, bin_dir: Path, data: Path, port: int, user: Optional[str]) -> None:
        self.bin_dir, self.data, self.port, self.user = bin_dir, data, port, user
        self.url = f"postgresql://postgres@127.0.0.1:{port}/postgres"

    def ctl(self, *args: str) -> None:
        """Run ``pg_ctl`` on this cluster (``"restart"``, ``"stop"``...), as its user."""
        subprocess.run(
            [str(self.bin_dir / "pg_ctl"), "-D", str(self.data), "-w", "-l", str(self.log), *args],
            check=True,
            user=self.user,
            stdout=subprocess.DEVNULL,
        )

    @property
    def log(self) -> Path:
        return self.data.parent / "server.log"

    def describe(self) -> str:
        """What a test needs to restart it (``WHISPERR_TEST_POSTGRES_CTL``)."""
        return json.dumps(
            {"bin": str(self.bin_dir), "data": str(self.data), "port": self.port, "user": self.user}
        )


@contextmanager
def throwaway_server() -> Iterator[Optional[Server]]:
    bin_dir = find_bin()
    if bin_dir is None:
        yield None
        return
    user = "postgres" if os.geteuid() == 0 else None
    root = Path(tempfile.mkdtemp(prefix="whisperr-pg-"))
    try:
        if user is not None:
            shutil.chown(root, user)
        data = root / "data"
        subprocess.run(
            [
                str(bin_dir / "initdb"),
                "-D",
                str(data),
                "--auth=trust",
                "-U",
                "postgres",
                "-E",
                "UTF8",
            ],
            check=True,
            user=user,
            stdout=subprocess.DEVNULL,
        )
        port = _free_port()
        options = (
            f"-p {port} -c listen_addresses=127.0.0.1 -k {root} -c fsync=off "
            "-c full_page_writes=off -c max_connections=300"
        )
        server = Server(bin_dir, data, port, user)
        server.ctl("start", "-o", options)
        try:
            yield server
        finally:
            server.ctl("stop", "-m", "immediate")
    finally:
        shutil.rmtree(root, ignore_errors=True)
