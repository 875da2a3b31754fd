"""A simulated power cut: what a directory holds after the machine lost power mid-run.

Durability claims are tested here by dropping every write that was never made durable, not
by counting fsync calls. Not collected by pytest: its name does not start with ``test_``.

How it works. A child Python process runs under ``powercut_shim.c`` (``LD_PRELOAD``). The
shim watches one directory (``POWERCUT_DIR``, the "disk") and, on every fsync()/fdatasync()
that returns 0, records in a second directory (``POWERCUT_SNAP``):

- for a regular file directly inside the disk: a copy of its whole content, under its base
  name (taken before the real call, put in place by rename() once the call returned);
- for the disk directory itself: the names of the regular files in it (``.dirlist``);
- ``sync()``, and ``syncfs()`` on the disk's file system, record both for every file.

The test chooses the moment of the cut from the lines the child prints and SIGKILLs the
child's whole process group (:meth:`Child.kill`). :func:`durable_image` then builds the
directory as it would be found after the power cut:

- the names are those of the last directory fsync; without one, those that existed when the
  run started (so a file created during the run and never followed by a directory fsync
  vanishes, and one deleted without a directory fsync comes back);
- a file's content is its last fsynced content; without one, its content when the run
  started; without either (a file named by a directory fsync but never fsynced itself),
  empty: its data never had to reach the disk;
- ``-shm`` files are never part of the image (SQLite rebuilds them from the WAL).

This is the most pessimistic outcome POSIX allows for whole-file writes: everything not
fsynced is lost, nothing fsynced is. What it does not simulate:

- torn or partial writes: a write that was not fsynced is lost entirely, never half there,
  and sectors written before an fsync are never damaged by the cut;
- reordering within one fsync, or a file that holds some but not all of its unsynced writes
  (a real disk may keep any subset of them: this model only ever keeps none);
- writes through mmap (``msync`` is not intercepted: SQLite maps only the ``-shm`` file,
  which is not part of the image), files opened with ``O_SYNC``/``O_DSYNC``, and
  ``sync_file_range``;
- subdirectories of the disk, and a name deleted and created again (a new inode) during the
  run: a name's snapshot is the last fsynced content of whatever file bore that name;
- a cut while the fsync call itself is running: the call did not return, so nothing of it
  is recorded (a real disk may have kept some or all of it);
- processes that do not run under the shim, or that are not killed by the cut: only the
  child and its descendants (one process group) are.

Names starting with ``.powercut-tmp`` and the name ``.dirlist`` are reserved in the snapshot
directory; the snapshot and initial directories must not be inside the disk.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NoReturn, Optional, Union

import pytest

TESTS_DIR = Path(__file__).resolve().parent
ROOT = TESTS_DIR.parent
SHIM_SOURCE = TESTS_DIR / "powercut_shim.c"
DIRLIST = ".dirlist"
# How long a child gets to print the line a test waits for before the test fails.
DEFAULT_LINE_TIMEOUT = 10.0

_CFLAGS = ("-shared", "-fPIC", "-O2", "-pthread", "-Wall")
_build_lock = threading.Lock()


def build_shim(build_dir: Path) -> Path:
    """The shim compiled into ``build_dir`` (once: a build of the same source is reused).

    Skips the calling test if there is no C compiler; a compiler that fails is an error.
    """
    digest = hashlib.sha256(SHIM_SOURCE.read_bytes() + " ".join(_CFLAGS).encode())
    target = Path(build_dir) / f"powercut_shim-{digest.hexdigest()[:12]}.so"
    with _build_lock:
        if target.is_file():
            return target
        compiler = _find_compiler()
        if compiler is None:
            pytest.skip("no C compiler (cc, gcc or $CC) to build tests/powercut_shim.c")
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f"{target.name}.{os.getpid()}.tmp")
        command = [compiler, *_CFLAGS, "-o", str(partial), str(SHIM_SOURCE), "-ldl"]
        built = subprocess.run(command, capture_output=True, text=True, timeout=120)
        if built.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed:\n{built.stdout}{built.stderr}")
        os.replace(partial, target)  # a concurrent build finds a whole library or none
    return target


def _find_compiler() -> Optional[str]:
    for name in (os.environ.get("CC"), "cc", "gcc"):
        if name and shutil.which(name):
            return name
    return None


@dataclass(frozen=True)
class Line:
    """One line a child printed, and the parent's ``time.monotonic()`` when it was read."""

    text: str
    at: float


LineMatch = Union[str, Callable[[str], bool]]


class Child:
    """A child Python process running under the shim, its stdout read line by line.

    Lines are read by a thread as they arrive, so waiting for one never depends on the
    child's buffering beyond its own ``flush``. Made by :meth:`PowerCut.spawn`.
    """

    def __init__(self, process: subprocess.Popen[str], shim: Path) -> None:
        self.process = process
        self.shim = shim
        self.lines: list[Line] = []  # every line read so far, in order
        self._unread: queue.Queue[Optional[Line]] = queue.Queue()
        self._stderr: list[str] = []
        self._shim_checked = False
        self._readers = [
            threading.Thread(target=self._read_stdout, daemon=True),
            threading.Thread(target=self._read_stderr, daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    @property
    def pid(self) -> int:
        return self.process.pid

    def _read_stdout(self) -> None:
        assert self.process.stdout is not None
        for text in self.process.stdout:
            line = Line(text.rstrip("\n"), time.monotonic())
            self.lines.append(line)
            self._unread.put(line)
        self._unread.put(None)  # end of output

    def _read_stderr(self) -> None:
        assert self.process.stderr is not None
        for text in self.process.stderr:
            self._stderr.append(text)

    @property
    def stderr(self) -> str:
        """What the child wrote to stderr so far (all of it once it has exited)."""
        return "".join(self._stderr)

    def next_line(self, timeout: float = DEFAULT_LINE_TIMEOUT) -> Line:
        """The next line the child printed; fails the test after ``timeout`` seconds or if
        the child's output ended."""
        try:
            line = self._unread.get(timeout=timeout)
        except queue.Empty:
            self._fail(f"no line from the child within {timeout} s")
        if line is None:
            self._unread.put(None)  # stays ended for the next caller
            self.process.wait(5)
            self._fail(f"the child's output ended (exit status {self.process.returncode})")
        if not self._shim_checked:
            self._shim_checked = True
            self.assert_shim_loaded()
        return line

    def wait_for(self, match: LineMatch, timeout: float = DEFAULT_LINE_TIMEOUT) -> Line:
        """Read lines until one equals ``match`` (a string) or satisfies it (a predicate),
        for at most ``timeout`` seconds in all."""
        deadline = time.monotonic() + timeout
        while True:
            line = self.next_line(max(0.0, deadline - time.monotonic()))
            if match(line.text) if callable(match) else line.text == match:
                return line

    def assert_shim_loaded(self) -> None:
        """Fail unless the shim is mapped into the child (ld.so only warns if it is not)."""
        try:
            maps = Path(f"/proc/{self.pid}/maps").read_text()
        except OSError:
            return  # already gone: the snapshots it left tell the rest
        if str(self.shim) not in maps:
            self._fail(f"the shim {self.shim} is not loaded in the child")

    def kill(self) -> float:
        """The power cut: SIGKILL the child's process group and reap it.

        Returns the parent's ``time.monotonic()`` just before the signal. When it returns,
        nothing in the group can sync any more, and :attr:`lines` holds every line the
        child printed.
        """
        at = time.monotonic()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)
        for reader in self._readers:
            reader.join(10)
        return at

    def wait(self, timeout: float = DEFAULT_LINE_TIMEOUT) -> int:
        """Wait for the child to exit by itself; its exit status."""
        code = self.process.wait(timeout)
        for reader in self._readers:
            reader.join(10)
        return code

    def _fail(self, why: str) -> NoReturn:
        if self.process.poll() is None:
            self.kill()
        pytest.fail(f"{why}; its stderr:\n{self.stderr}", pytrace=False)


class PowerCut:
    """One simulated machine: a disk directory, its snapshots, and the children run on it.

    Under ``root``: ``disk/`` (the watched directory: children write there, and find it as
    ``os.environ["POWERCUT_DIR"]``), ``snap/`` (what the shim recorded) and ``initial/``
    (the disk when the first child started). Several children may run, one after the other
    or together, before one power cut; :meth:`image` is that cut's result.
    """

    def __init__(self, root: Path, shim: Path) -> None:
        self.root = Path(root).resolve()
        self.shim = Path(shim).resolve()
        self.disk = self.root / "disk"
        self.snap = self.root / "snap"
        self.initial = self.root / "initial"
        self.disk.mkdir(parents=True)
        self.snap.mkdir()
        self._started = False
        self.children: list[Child] = []

    def spawn(self, code: str, *args: str, env: Optional[Mapping[str, str]] = None) -> Child:
        """Start ``python -c code *args`` under the shim, in a process group of its own.

        The first spawn takes the initial snapshot of the disk. ``env`` adds variables. The
        child's stdout is read by :class:`Child`; stdin is closed.
        """
        if not self._started:
            take_initial(self.disk, self.initial)
            self._started = True
        child_env = dict(os.environ)
        child_env.update(env or {})
        preload = child_env.get("LD_PRELOAD", "")
        child_env["LD_PRELOAD"] = f"{self.shim} {preload}".strip()
        child_env["POWERCUT_DIR"] = str(self.disk)
        child_env["POWERCUT_SNAP"] = str(self.snap)
        child_env["PYTHONUNBUFFERED"] = "1"
        child_env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(ROOT), child_env.get("PYTHONPATH", "")) if p
        )
        process = subprocess.Popen(
            [sys.executable, "-c", code, *args],
            cwd=self.root,
            env=child_env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        child = Child(process, self.shim)
        self.children.append(child)
        return child

    def image(self, dest: Optional[Path] = None) -> Path:
        """The disk as found after the power cut (every child must have ended by now)."""
        running = [c.pid for c in self.children if c.process.poll() is None]
        assert not running, f"children {running} still run: kill() them first"
        if dest is None:
            n = sum(1 for _ in self.root.glob("image*"))
            dest = self.root / f"image{n or ''}"
        return durable_image(self.disk, self.snap, self.initial, dest)

    def close(self) -> None:
        """Kill whatever child still runs (a test that failed half-way)."""
        for child in self.children:
            if child.process.poll() is None:
                child.kill()


@contextlib.contextmanager
def power_cut(root: Path, shim: Path) -> Iterator[PowerCut]:
    """A :class:`PowerCut` whose children are all killed on the way out."""
    machine = PowerCut(root, shim)
    try:
        yield machine
    finally:
        machine.close()


def take_initial(watch_dir: Path, initial: Path) -> None:
    """Copy the regular files of ``watch_dir`` into a new directory ``initial``: the state
    the run starts from, assumed durable."""
    initial.mkdir(parents=True)
    for entry in os.scandir(watch_dir):
        if entry.is_file(follow_symlinks=False):
            shutil.copyfile(entry.path, initial / entry.name)


def durable_image(watch_dir: Path, snap_dir: Path, initial: Path, dest: Path) -> Path:
    """Build in ``dest`` (new, or empty) the directory ``watch_dir`` as found after the cut.

    ``snap_dir`` holds what the shim recorded during the run, ``initial`` the content of
    ``watch_dir`` when the run started (:func:`take_initial`). The model is in the module
    docstring. Returns ``dest``.
    """
    watch_dir, snap_dir, initial, dest = (
        Path(p).resolve() for p in (watch_dir, snap_dir, initial, dest)
    )
    for inner in (snap_dir, initial, dest):
        if inner == watch_dir or watch_dir in inner.parents:
            raise ValueError(f"{inner} is inside the watched directory {watch_dir}")
    dest.mkdir(parents=True, exist_ok=True)
    if any(dest.iterdir()):
        raise ValueError(f"{dest} is not empty")
    at_start = {e.name for e in os.scandir(initial) if e.is_file(follow_symlinks=False)}
    dirlist = snap_dir / DIRLIST
    names = set(dirlist.read_text().splitlines()) if dirlist.is_file() else set(at_start)
    for name in sorted(names):
        if not name or name.endswith("-shm"):
            continue
        if (snap_dir / name).is_file():
            shutil.copyfile(snap_dir / name, dest / name)
        elif name in at_start:
            shutil.copyfile(initial / name, dest / name)
        else:
            (dest / name).write_bytes(b"")
    return dest
