"""Writing artifacts safely: nothing half-written is ever left behind, and files are readable by the team.

``write_atomic`` writes into a temporary file in the target's folder, then renames it over the
target (atomic on POSIX and Windows). The temporary is created with mode ``0o666`` filtered by
the process umask, exactly like ``open(path, "w")`` (0644 under the usual umask 022), so the
renamed artifact has normal permissions.

A temporary is named ``.<name>.<host>.<pid>.<8 hex>.tmp``. A writer killed mid-write (SIGKILL,
out of memory, power loss) cannot remove its own; the next ``write_atomic`` into the same folder
removes the temporaries of processes on this host that no longer run. Temporaries of live
processes, and of other hosts sharing the folder, are left alone.

Plain data: imports no torch.
"""
from __future__ import annotations

import os
import re
import secrets
import socket
from pathlib import Path

_TMP = re.compile(r"^\..+\.(?P<host>[^.]+)\.(?P<pid>\d+)\.[0-9a-f]{8}\.tmp$")


def _host() -> str:
    """This host's name as it appears in temporary names (dots, which separate the fields, removed)."""
    return re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname().split(".")[0]) or "host"


def temporary_name(path: str | os.PathLike) -> Path:
    """A fresh temporary path next to ``path``, tagged with this host and process id."""
    p = Path(path)
    return p.with_name(f".{p.name}.{_host()}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, but belongs to another user
        return True
    except OSError:
        return True
    return True


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporaries that writers on this host left in ``folder`` when they died.

    Returns:
        The paths removed.
    """
    host, removed = _host(), []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        m = _TMP.match(name)
        if m is None or m.group("host") != host or _alive(int(m.group("pid"))):
            continue
        stale = Path(folder) / name
        try:
            stale.unlink()
            removed.append(stale)
        except OSError:
            pass  # another writer removed it first, or the folder is read-only for us
    return removed


def write_atomic(path: str | os.PathLike, text: str | bytes) -> Path:
    """Write ``text`` to ``path`` through a temporary file in the same folder, then rename.

    The file gets the mode ``open()`` would give it (``0o666`` minus the umask). Temporaries left
    by dead writers in that folder are removed first (``remove_stale_temporaries``).

    Args:
        path: the artifact's path (its folder is created if needed).
        text: the content (``str`` is written as UTF-8).

    Returns:
        ``path`` as a ``Path``.

    Raises:
        OSError: the folder cannot be created or written (nothing is left behind then).
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(p.parent)
    tmp = temporary_name(p)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(text.encode() if isinstance(text, str) else text)
        os.replace(tmp, p)
    except BaseException:
        if tmp.exists():
            tmp.unlink()
        raise
    return p
