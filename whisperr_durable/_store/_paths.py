"""The outbox path, trusted only once it is a private regular file of ours."""

from __future__ import annotations

import os
import stat
from contextlib import suppress

from ._records import StoreError


def user_name(uid: int) -> str:
    try:
        import pwd

        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except (ImportError, KeyError):
        return f"uid {uid}"


def access_note(path: str) -> str:
    """Who this process is and who owns the file (or the nearest directory above it that
    this process can see): what a person needs to mend "readonly" or "unable to open"."""
    me = f"this process runs as {user_name(os.geteuid())}"
    name = path
    while True:
        try:
            st = os.stat(name)
        except OSError:
            parent = os.path.dirname(name)
            if parent == name:
                return me
            name = parent
            continue
        mode = stat.S_IMODE(st.st_mode)
        return f"{me}; {name} belongs to {user_name(st.st_uid)}, mode {mode:04o}"


def check_usable(path: str) -> None:
    """``StoreError`` now, naming the path, this process's user and the owner, if this
    process could not make or write the outbox at ``path``: for a check at startup, without
    creating anything."""
    if os.path.lexists(path):
        check_ours(path)
        if not os.access(path, os.R_OK | os.W_OK):
            raise StoreError(f"{path} cannot be written: {access_note(path)}")
        return
    parent = os.path.dirname(path)
    while parent and not os.path.isdir(parent) and parent != os.path.dirname(parent):
        parent = os.path.dirname(parent)
    if not os.access(parent or ".", os.W_OK | os.X_OK):
        raise StoreError(f"{path} cannot be made: {access_note(path)}")


def sidecars(path: str) -> tuple[str, str]:
    return path + "-wal", path + "-shm"


def prepare_path(path: str) -> bool:
    """Make sure the outbox file is ours and private before SQLite opens anything; returns
    whether the file is new (empty).

    In a shared directory (``/tmp``) another user can place a symbolic link at the path, or
    a file of their own that they can read and write: we would then queue events into their
    hands, and deliver, with our key, rows they inserted. So the file, its ``-wal`` and its
    ``-shm`` must be regular files of ours (one that is too open is made private); the file
    is created here, 0600, never through a link. SQLite itself never follows a link to
    ``-wal`` or ``-shm``, and the two are checked again once SQLite has opened them. Files are
    only ever created or looked at here, never opened: closing any descriptor of a file
    drops every POSIX lock this process holds on it, SQLite's included, and another process
    could then checkpoint and delete the WAL our connections still write to.
    """
    # Every directory we create is 0700 (os.makedirs would give only the last one the mode).
    missing = []
    parent = os.path.dirname(path)
    while parent and not os.path.isdir(parent) and parent != os.path.dirname(parent):
        missing.append(parent)
        parent = os.path.dirname(parent)
    for directory in reversed(missing):
        with suppress(FileExistsError):
            os.mkdir(directory, 0o700)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:  # also a link, dangling or not: check_ours refuses it
        pass
    else:
        os.close(fd)  # a new inode: no lock of anyone's is on it
    check_ours(path)
    writable = os.access(path, os.W_OK)
    for name in sidecars(path):
        check_ours(name, writable=writable)
    # Empty: made just now (or by a process that died before it wrote the schema).
    return os.stat(path).st_size == 0


def check_ours(name: str, *, writable: bool = False) -> None:
    """Refuse ``name`` unless it is a regular file of ours; make it private. ``writable``:
    it is the -wal or -shm of a file we can write, so it must be writable too (SQLite gives
    them the mode of the database file as it was when it made them: a file that was
    read-only then would stay unusable once writable again)."""
    try:
        st = os.lstat(name)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode):
        raise StoreError(f"{name} is a symbolic link; an outbox is never opened through one")
    if not stat.S_ISREG(st.st_mode):
        raise StoreError(f"{name} is not a regular file")
    if st.st_uid != os.geteuid():
        raise StoreError(
            f"{name} belongs to {user_name(st.st_uid)} (mode {stat.S_IMODE(st.st_mode):04o}), not "
            f"to this process's user {user_name(os.geteuid())}: refusing a file that another user "
            "can read or fill"
        )
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077 or (writable and mode & 0o600 != 0o600):
        os.chmod(name, 0o600)  # ours, and not a link: make it private


def sync_directory(path: str) -> None:
    """fsync the directory holding ``path``, so that the file's name survives a power cut."""
    fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
