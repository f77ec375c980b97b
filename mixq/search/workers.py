"""Several workers on one study: one latency measurement at a time per machine, latencies shared through the
study, trials of dead workers re-queued, and exactly ``n_trials`` finished trials however many workers run.

- ``LatencyLock``: an ``fcntl`` lock file per machine (``$MIXQ_LATENCY_LOCK`` or ``<tmp>/mixq-latency.lock``).
  Two processes timing on one CPU at once slow each other down and both record the slowed numbers, so every
  measurement of every mixq process on the machine holds it; it counts the seconds spent waiting for it.
- ``SharedLatencies``: measured latencies live in the study's user attrs (``mixq_lat:<plan digest>`` ->
  milliseconds, host, pid, setup digest), so a plan is measured once in the whole study, and each worker can
  say which machine measured what. The study records the latency setup (engine version, CPU, threads, clock,
  runs ...) of its first measurement and refuses latencies from another setup.
- ``requeue``: a RUNNING trial whose process is gone (same host: the pid and its start time; any host on an RDB
  storage: its heartbeat stopped) is marked FAIL and its plan enqueued again for the survivors.
- ``is_surplus``: with several workers asking at once the study could overshoot ``n_trials``; a trial with
  ``n_trials`` live or finished trials before it (by number) is surplus and is failed without running.

Imports no torch.
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

from mixq.errors import ConfigError, MixqError

LAT_PREFIX = "mixq_lat:"
SETUP_ATTR = "mixq_latency_setup"
FP32_ATTR = "mixq_fp32_ms"
SURPLUS_ATTR = "mixq_surplus"
HEARTBEAT_S = 10  # RDB storages: a trial is stale after 3 heartbeats missed
ORPHAN_S = 120.0  # a RUNNING trial that never said which worker runs it (killed between ask and its first write)


def plan_digest(assignment: Mapping[str, str]) -> str:
    """A short stable digest of a full assignment (the key of its latency in the study)."""
    text = json.dumps(sorted(assignment.items()), separators=(",", ":"))
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def default_lock_path() -> Path:
    """The machine's latency lock file: ``$MIXQ_LATENCY_LOCK`` or ``<tmp>/mixq-latency.lock``."""
    return Path(os.environ.get("MIXQ_LATENCY_LOCK") or Path(tempfile.gettempdir()) / "mixq-latency.lock")


class LatencyLock:
    """An exclusive ``fcntl`` lock held while a latency is measured (a context manager; re-entrant per object).

    Attributes:
        path: the lock file.
        waited_s: seconds spent waiting for the lock so far.
    """

    def __init__(self, path: Optional[os.PathLike | str] = None) -> None:
        self.path = Path(path) if path is not None else default_lock_path()
        self.waited_s = 0.0
        self._fh = None
        self._depth = 0

    def __enter__(self) -> "LatencyLock":
        import fcntl

        if self._depth == 0:
            try:
                fh = open(self.path, "a")
            except OSError as e:
                raise MixqError(f"cannot open the latency lock file {str(self.path)!r} ({e.strerror}); set "
                                "MIXQ_LATENCY_LOCK to a writable file path.") from None
            t = time.perf_counter()
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            self.waited_s += time.perf_counter() - t
            self._fh = fh
        self._depth += 1
        return self

    def __exit__(self, *exc: Any) -> None:
        self._depth -= 1
        if self._depth == 0 and self._fh is not None:
            self._fh.close()  # closing the file releases the lock
            self._fh = None


def setup_digest(setup: Any) -> str:
    """A digest of a latency setup (a dict, or any JSON-able value)."""
    return hashlib.sha1(json.dumps(setup, sort_keys=True, default=str).encode()).hexdigest()[:12]


class SharedLatencies:
    """Latencies of a study, kept in its user attrs and measured under the machine's lock.

    Args:
        study: the Optuna study.
        latency: plan -> ms (the measurement itself).
        setup: what the measurements depend on (engine, CPU, threads, clock, runs ...); recorded on the study
            at the first measurement, checked on every later worker.
        lock: the machine's ``LatencyLock`` (None: no lock; a single process in memory).

    Raises:
        ConfigError: the study's latencies were measured with another setup (at construction).
    """

    def __init__(self, study: Any, latency: Callable[[Mapping[str, str]], float], setup: Any,
                 lock: Optional[LatencyLock] = None) -> None:
        self.study, self.latency, self.lock = study, latency, lock
        self.setup = setup_digest(setup)
        self.me = {"host": socket.gethostname(), "pid": os.getpid()}
        self.measured = 0  # plans this process measured
        self.reused = 0  # plans another worker had measured
        attrs = study.user_attrs
        theirs = attrs.get(SETUP_ATTR)
        if theirs is None:
            study.set_user_attr(SETUP_ATTR, {"digest": self.setup, "setup": setup})
        elif theirs.get("digest") != self.setup:
            raise ConfigError(f"study {study.study_name!r} holds latencies measured with another setup "
                              f"({_setup_text(theirs.get('setup'))}); this worker measures with "
                              f"{_setup_text(setup)}. Run it where the engine setup is the same, or use another "
                              "--study name.")

    def lookup(self, assignment: Mapping[str, str]) -> Optional[float]:
        """The study's latency of the plan, or None when no worker has measured it."""
        entry = self.study._storage.get_study_user_attrs(self.study._study_id).get(LAT_PREFIX +
                                                                                     plan_digest(assignment))
        if entry is None:
            return None
        if entry.get("setup") != self.setup:
            raise ConfigError(f"study {self.study.study_name!r}: the latency of a plan was measured on "
                              f"{entry.get('host')!r} with another setup ({entry.get('setup')}, here {self.setup}); "
                              "the study refuses it.")
        return float(entry["ms"])

    def __call__(self, assignment: Mapping[str, str]) -> tuple[float, float, Optional[str]]:
        """(ms, seconds waited for the lock, host that measured it)."""
        ms = self.lookup(assignment)
        if ms is not None:
            self.reused += 1
            return ms, 0.0, self._host(assignment)
        if self.lock is None:
            return self._measure(assignment), 0.0, self.me["host"]
        before = self.lock.waited_s
        with self.lock:
            waited = self.lock.waited_s - before
            ms = self.lookup(assignment)  # measured by another worker of this machine while we waited
            if ms is not None:
                self.reused += 1
                return ms, waited, self._host(assignment)
            return self._measure(assignment), waited, self.me["host"]

    def _host(self, assignment: Mapping[str, str]) -> Optional[str]:
        e = self.study._storage.get_study_user_attrs(self.study._study_id).get(LAT_PREFIX + plan_digest(assignment))
        return None if e is None else e.get("host")

    def _measure(self, assignment: Mapping[str, str]) -> float:
        ms = float(self.latency(assignment))
        self.study.set_user_attr(LAT_PREFIX + plan_digest(assignment),
                                 {"ms": ms, **self.me, "setup": self.setup, "at": time.time()})
        self.measured += 1
        return ms

    def publish(self, assignment: Mapping[str, str], ms: float) -> None:
        """Record a latency measured outside the study (e.g. the FP32 one the budget is relative to)."""
        if self.lookup(assignment) is None:
            self.study.set_user_attr(LAT_PREFIX + plan_digest(assignment),
                                     {"ms": float(ms), **self.me, "setup": self.setup, "at": time.time()})


def _setup_text(setup: Any) -> str:
    if isinstance(setup, Mapping):
        return ", ".join(f"{k}={v}" for k, v in setup.items())
    return str(setup)


def study_latencies(attrs: Mapping[str, Any]) -> dict:
    """Plan digest -> latency entry (ms, host, pid, setup) from a study's user attrs."""
    return {k[len(LAT_PREFIX):]: v for k, v in attrs.items() if k.startswith(LAT_PREFIX)}


# ----------------------------------------------------------------------------- dead workers and trial counts
def requeue(study: Any, trial: Any) -> None:
    """Enqueue the plan of a failed trial again (for the survivors), keeping its baseline label.

    Also Optuna's ``heartbeat_stale_trial_callback`` of an RDB storage (``open_storage(heartbeat_s=...)``).
    """
    attrs = {k: v for k, v in trial.user_attrs.items() if k == "baseline"}
    study.enqueue_trial(dict(trial.params) or dict(trial.system_attrs.get("fixed_params") or {}),
                        user_attrs={**attrs, "retry_of": trial.number})


def reap(study: Any, exclusive: bool, is_dead: Callable[[Any], Optional[bool]]) -> tuple[list, list]:
    """Fail the RUNNING trials whose worker is gone and enqueue their plans again.

    A trial is gone when ``exclusive`` (this process is the only one using the study), when its recorded
    worker is a dead process of this host, or (RDB storages with heartbeats) when its heartbeat stopped.

    Returns:
        (numbers failed and re-queued now, numbers of RUNNING trials left alone).
    """
    import optuna
    from optuna.trial import TrialState

    storage = study._storage
    failed, left = [], []
    if getattr(storage, "get_heartbeat_interval", lambda: None)() is not None:
        before = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)  # the storage's callback (``requeue``) re-queues them
        failed += [t.number for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
                   if t.number not in before and not t.user_attrs.get(SURPLUS_ATTR)]
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = t.user_attrs.get("worker")
        dead = True if exclusive else is_dead(worker)
        if worker is None and dead is None and t.datetime_start is not None:
            dead = time.time() - t.datetime_start.timestamp() > ORPHAN_S
        if dead is not True:
            left.append(t.number)
            continue
        try:
            ok = storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        except (optuna.exceptions.UpdateFinishedTrialError, RuntimeError):
            ok = False  # another survivor got there first and re-queues it
        if ok:
            requeue(study, t)
            failed.append(t.number)
    return sorted(set(failed)), left


def counts(study: Any) -> dict:
    """Trials of the study by state: complete, running, waiting, fail."""
    from optuna.trial import TrialState

    out = {"complete": 0, "running": 0, "waiting": 0, "fail": 0}
    names = {TrialState.COMPLETE: "complete", TrialState.RUNNING: "running", TrialState.WAITING: "waiting",
             TrialState.FAIL: "fail"}
    for t in study.get_trials(deepcopy=False):
        if t.state in names:
            out[names[t.state]] += 1
    return out


def is_surplus(study: Any, trial: Any, n_trials: int) -> bool:
    """Whether ``n_trials`` trials numbered below ``trial`` are finished, running or queued already."""
    from optuna.trial import TrialState

    live = (TrialState.COMPLETE, TrialState.RUNNING, TrialState.WAITING)
    return sum(t.number < trial.number and t.state in live for t in study.get_trials(deepcopy=False)) >= n_trials


class Heartbeat:
    """Records the heartbeat of a RUNNING trial every interval on an RDB storage with heartbeats (a thread);
    nothing on other storages. A context manager."""

    def __init__(self, storage: Any, trial_id: int) -> None:
        import threading

        self.storage, self.trial_id = storage, trial_id
        interval = getattr(storage, "get_heartbeat_interval", lambda: None)()
        self.interval = interval
        self._stop = threading.Event()
        self._thread = None if interval is None else threading.Thread(target=self._beat, daemon=True)

    def _beat(self) -> None:
        while True:
            try:
                self.storage.record_heartbeat(self.trial_id)
            except Exception:  # a lost connection: the trial turns stale and is retried elsewhere
                pass
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> "Heartbeat":
        if self._thread is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
