"""Where a study lives: any Optuna storage, by URL or journal-file path; fingerprints; trials of dead workers.

- ``open_storage``: ``None`` -> a journal file in the run folder (Optuna's ``JournalFileBackend``: several
  processes may append to it, and a killed writer loses at most the line it was writing);
  ``sqlite:///``, ``postgresql://``, ``mysql://`` ... -> ``RDBStorage``; a path -> a journal file there.
  A URL that does not open is a ``ConfigError`` that shows it without its password.
- ``check_fingerprint``: a study records what its trials mean (model, data, backend, formats, budget ...)
  in its user attrs; a study made for something else is refused, naming what differs.
- ``worker_id`` / ``is_dead``: each trial records the process that ran it (host, pid, process start time),
  so a RUNNING trial left by a killed process on this host can be told apart from one a live worker runs.

Imports no torch.
"""
from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from typing import Any, Mapping, Optional

from mixq.errors import ConfigError

JOURNAL_SUFFIXES = (".journal", ".log", ".jsonl")
_RDB_SCHEMES = ("sqlite", "postgresql", "postgres", "mysql", "mariadb", "oracle", "mssql")
_URL = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*)://(?P<rest>.*)$")
FINGERPRINT_ATTR = "mixq_fingerprint"
_DRIVERS = {"postgresql": "psycopg2", "postgres": "psycopg2", "mysql": "pymysql or mysqlclient",
            "mariadb": "pymysql or mariadb", "oracle": "oracledb", "mssql": "pyodbc"}

_PART_WORDS = {"model": "the model (weights or code)", "calib_data": "the calibration data",
               "eval_data": "the search-split data", "metric": "the metric", "task": "the task",
               "backend": "the backend", "formats": "the formats of the space", "calib_method": "the calibration method",
               "space": "the search space (units and their choices)", "budget": "the budget",
               "objective": "the objectives (--front or a single metric)", "latency": "the latency measurement "
               "setup (engine version, threads, clock, runs, CPU)",
               "latency_mode": "how the search times a plan (ratio to FP32 next to it, and its rounds)",
               "evaluate": "how a plan's metric is measured (--evaluate: simulation or engine)"}


def mask_url(url: str) -> str:
    """``url`` with any password replaced by ``***`` (``postgresql://u:***@host/db``)."""
    m = _URL.match(url)
    if not m:
        return url
    rest = re.sub(r"^([^/@:]*):([^@/]*)@", r"\1:***@", m.group("rest"))
    rest = re.sub(r"(?i)(password=)[^&;]*", r"\1***", rest)
    return f"{m.group('scheme')}://{rest}"


def _password(url: str) -> Optional[str]:
    m = re.match(r"^[^:]+://[^/@:]*:([^@/]*)@", url)
    return m.group(1) if m and m.group(1) else None


def _scrub(text: str, url: str) -> str:
    pw = _password(url)
    text = text.replace(url, mask_url(url))
    return text.replace(pw, "***") if pw else text


def describe_storage(url: Optional[str], default_path: Path) -> str:
    """What a storage argument means, for messages and the report (no password)."""
    if url is None:
        return f"journal file {default_path}"
    return mask_url(url) if _URL.match(url) else f"journal file {url}"


def dashboard_url(url: Optional[str], default_path: Path) -> str:
    """The argument ``optuna-dashboard`` takes for this storage (a journal file path or the RDB URL, masked)."""
    if url is None:
        return str(default_path)
    return mask_url(url)


def open_storage(url: Optional[str], default_path: Path, exclusive: bool = False,
                 heartbeat_s: Optional[int] = 10) -> Any:
    """Open an Optuna storage.

    Args:
        url: None (a journal file at ``default_path``), an RDB URL (``sqlite:///run/study.db``,
            ``postgresql://user:pw@host/db``), or a journal file path (``run/study.journal``).
        default_path: the journal file used when ``url`` is None.
        exclusive: the caller holds the only right to write this journal (e.g. it locked the run folder): a
            journal lock file left by a writer killed while it held it is removed (Optuna would wait 30 s and
            then break it).
        heartbeat_s: RDB storages: each RUNNING trial records a heartbeat this often; a trial that missed
            three is failed by the next worker that looks and its plan re-queued (``mixq.search.workers.requeue``),
            so a worker killed on another machine loses only its trial in flight. None: no heartbeats.

    Returns:
        An Optuna ``BaseStorage``.

    Raises:
        ConfigError: an unknown scheme, a journal path in a folder that does not exist, or an RDB URL that
            does not open (missing driver, unreachable server, bad file path); the message shows the URL
            without its password and lists the valid forms.
    """
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    valid = ("valid storages: a journal file path (e.g. run/study.journal), sqlite:///path/study.db, "
             "postgresql://user:password@host/db, mysql://user:password@host/db")
    if url is None or not _URL.match(url):
        path = Path(default_path if url is None else url)
        if path.is_dir():
            raise ConfigError(f"storage {str(path)!r} is a folder; give a journal file path such as "
                              f"{str(path / 'study.journal')!r} ({valid}).")
        if not path.parent.is_dir():
            raise ConfigError(f"storage {str(path)!r}: its folder {str(path.parent)!r} does not exist ({valid}).")
        if not os.access(path.parent, os.W_OK):
            raise ConfigError(f"storage {str(path)!r}: its folder is not writable ({valid}).")
        if exclusive:
            Path(str(path) + ".lock").unlink(missing_ok=True)
        try:
            return JournalStorage(JournalFileBackend(str(path), lock_obj=_FlockLock(str(path) + ".flock")))
        except Exception as e:  # an unreadable journal (not Optuna's format) raises several types
            raise ConfigError(f"storage {str(path)!r} is not a readable Optuna journal ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}); give another path ({valid}).") from None
    scheme = _URL.match(url).group("scheme").split("+")[0].lower()
    if scheme not in _RDB_SCHEMES:
        raise ConfigError(f"storage {mask_url(url)!r}: unknown scheme {scheme!r}; {valid}.")
    if scheme == "sqlite":
        path = url.split(":///", 1)[1] if ":///" in url else ""
        if path and path != ":memory:" and not Path(path).parent.is_dir():
            raise ConfigError(f"storage {mask_url(url)!r}: the folder {str(Path(path).parent)!r} does not exist "
                              f"({valid}).")
    url = _with_driver(url, scheme)
    try:
        try:
            return _rdb(url, heartbeat_s)
        except Exception as e:  # workers opening a new database at once: another one created the tables first
            if "already exists" not in str(e):
                raise
            return _rdb(url, heartbeat_s)
    except ImportError as e:  # Optuna re-raises a missing driver as a plain ImportError
        driver = getattr(e, "name", None) or _DRIVERS.get(scheme, "its database driver")
        raise ConfigError(f"storage {mask_url(url)!r} needs the Python package {driver} (the {scheme} driver), "
                          f"which is not installed; install it or use a journal file ({valid}).") from None
    except Exception as e:  # sqlalchemy's ArgumentError / OperationalError, ValueError ...
        first = str(e).splitlines()[0] if str(e) else ""
        raise ConfigError(f"storage {mask_url(url)!r} does not open: {type(e).__name__}: "
                          f"{_scrub(first, url)[:300]} ({valid}).") from None


def _rdb(url: str, heartbeat_s: Optional[int]) -> Any:
    import time
    import warnings

    import optuna

    from mixq.search.workers import requeue

    kw = {} if heartbeat_s is None else {"heartbeat_interval": int(heartbeat_s), "grace_period": 3 * int(heartbeat_s),
                                         "heartbeat_stale_trial_callback": requeue}
    for attempt in range(5):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(url, **kw)
        except Exception as e:  # several workers creating the tables of a new database at once: one wins
            if attempt == 4 or type(e).__name__ != "IntegrityError":
                raise
            time.sleep(0.2 * (attempt + 1))


class _FlockLock:
    """The journal file's writer lock as an ``fcntl`` lock: the kernel releases it when its holder dies, so a
    worker killed while appending does not stall the others (Optuna's own lock file waits 30 s, then breaks)."""

    def __init__(self, path: str) -> None:
        self.path, self._fh = path, None

    def acquire(self) -> bool:
        import fcntl

        fh = open(self.path, "a")
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        self._fh = fh
        return True

    def release(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def _with_driver(url: str, scheme: str) -> str:
    """``postgresql://`` with the driver that is installed: SQLAlchemy 2.1 means psycopg (3) by it, the test extra
    installs psycopg2; ``postgres://`` is not a name SQLAlchemy knows."""
    import importlib.util

    m = _URL.match(url)
    if scheme != "postgresql" and scheme != "postgres" or "+" in m.group("scheme"):
        return url
    if importlib.util.find_spec("psycopg") is None and importlib.util.find_spec("psycopg2") is not None:
        return "postgresql+psycopg2://" + m.group("rest")
    return "postgresql://" + m.group("rest")


def check_fingerprint(study: Any, parts: Mapping[str, Any], storage_text: str) -> bool:
    """Record ``parts`` on a new study, or check them against the ones it holds.

    Returns:
        True when the study was new (no trials and no fingerprint yet).

    Raises:
        ConfigError: the study was made for something else; the message names every part that differs.
    """
    old = study.user_attrs.get(FINGERPRINT_ATTR)
    if old is None:
        if study.trials:
            raise ConfigError(f"study {study.study_name!r} in {storage_text} has {len(study.trials)} trials but no "
                              "mixq fingerprint: it was not made by mixq search; give another --study name.")
        study.set_user_attr(FINGERPRINT_ATTR, dict(parts))
        return True
    changed = sorted(k for k in set(old) | set(parts) if old.get(k) != parts.get(k))
    if changed:
        what = "; ".join(f"{_PART_WORDS.get(k, k)}: study {_short(old.get(k))}, now {_short(parts.get(k))}"
                         for k in changed)
        raise ConfigError(f"study {study.study_name!r} in {storage_text} was made for another search ({what}); its "
                          f"trials do not compare with this one. Give another --study name, another --run-dir, or "
                          f"--fresh to discard it.")
    return False


def _short(v: Any) -> str:
    s = str(v)
    return repr(s if len(s) <= 40 else s[:37] + "...")


# ----------------------------------------------------------------------------- workers
def _start_ticks(pid: int) -> Optional[str]:
    """The process start time in clock ticks since boot (Linux), which a reused pid does not share."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return None if fields[0] in ("Z", "X") else fields[19]  # a zombie has finished running


def worker_id() -> dict:
    """This process: host, pid and start time."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "start": _start_ticks(os.getpid())}


def is_dead(worker: Optional[Mapping[str, Any]]) -> Optional[bool]:
    """Whether the process that recorded ``worker`` is gone: True / False, or None when it cannot be told
    (another host, or no record)."""
    if not worker or worker.get("host") != socket.gethostname():
        return None
    pid = int(worker.get("pid", -1))
    if pid == os.getpid() and worker.get("start") == _start_ticks(pid):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass
    start = _start_ticks(pid)
    if start is None:
        return Path("/proc").is_dir()  # a zombie (reads as None on Linux); elsewhere: alive as far as we can tell
    return worker.get("start") is not None and start != worker.get("start")
