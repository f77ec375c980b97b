"""Several worker processes on one study (journal file and PostgreSQL): kills, the latency lock, shared latencies.

The workers are real processes running ``run_search`` on the constructed problem of ``test_search_cli`` (plain
callables that sleep a little: a "measurement" of 40 ms, an "evaluation" of 250 ms). Each logs what it measured
and evaluated, with its pid and the measurement's start and end, so the tests can see overlaps and repeats.

PostgreSQL: 127.0.0.1:5432 (user postgres or root, trust auth, database ``test``); each test creates and drops its
own database. Outside CI a test whose server is unreachable is skipped with the reason; with CI=true it fails.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from mixq.errors import ConfigError
from mixq.search import Budget, open_storage, run_search

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))
from test_search_cli import c_latency, c_metric, c_space, c_warm  # noqa: E402

WORKER = """
import json, os, sys, time
sys.path.insert(0, {tests!r})
from pathlib import Path
from test_search_cli import c_latency, c_metric, c_space, c_warm
from mixq.search import Budget, open_storage, run_search
from mixq.search.workers import LatencyLock

log = open({log!r}, "a")

def metric(a):
    busy = Path({busy!r}) / str(os.getpid())
    busy.touch()  # the test kills a worker only while this exists: mid-trial
    time.sleep(0.25)
    busy.unlink()
    log.write(json.dumps({{"pid": os.getpid(), "evaluated": a}}) + "\\n")
    log.flush()
    return c_metric(a)

def latency(a):
    t0 = time.time()
    time.sleep(0.04)
    log.write(json.dumps({{"pid": os.getpid(), "measured": a, "t0": t0, "t1": time.time()}}) + "\\n")
    log.flush()
    return c_latency(a)

space = c_space()
lock = None if {no_lock} else LatencyLock()
res = run_search(space, metric, latency, {trials}, Budget.parse("0.95x"), warm_start=c_warm(space),
                 storage=open_storage({storage!r}, Path({storage!r}), heartbeat_s=1), study_name="w",
                 fingerprint={{"problem": "constructed"}}, sampler="tpe", seed=int(sys.argv[1]),
                 latency_setup={{"engine": "toy", "threads": 1}}, lock=lock, poll_s=0.1)
print(json.dumps(res.timing))
"""


# ----------------------------------------------------------------------------- PostgreSQL
def _pg_url(db: str) -> str:
    return f"postgresql://{_pg_user()}@127.0.0.1:5432/{db}"


def _pg_user() -> str:
    import psycopg2

    for user in ("postgres", "root"):
        try:
            psycopg2.connect(host="127.0.0.1", port=5432, user=user, dbname="test", connect_timeout=3).close()
            return user
        except psycopg2.OperationalError:
            continue
    raise OSError("no PostgreSQL at 127.0.0.1:5432 that lets user postgres or root into database 'test'")


@pytest.fixture
def pg_url():
    """A fresh PostgreSQL database for one test (dropped afterwards)."""
    try:
        import psycopg2

        user = _pg_user()
    except (ImportError, OSError) as e:
        if os.environ.get("CI") == "true":
            pytest.fail(f"PostgreSQL is needed under CI=true: {e}")
        pytest.skip(f"PostgreSQL unreachable: {e}")
    name = f"mixq_w_{uuid.uuid4().hex[:10]}"
    con = psycopg2.connect(host="127.0.0.1", port=5432, user=user, dbname="test")
    con.autocommit = True
    con.cursor().execute(f"CREATE DATABASE {name}")
    try:
        yield _pg_url(name)
    finally:
        con.cursor().execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        con.close()


# ----------------------------------------------------------------------------- helpers
def _start(code: str, seed: int, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code, str(seed)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)


def _trials(storage: str):
    import optuna

    st = optuna.load_study(study_name="w", storage=open_storage(storage, Path(storage), heartbeat_s=None))
    return st.get_trials(deepcopy=False)


def _kill_mid_trial(proc: subprocess.Popen, busy: Path, delay: float, timeout: float = 60.0) -> None:
    """After ``delay`` s, SIGKILL ``proc`` as soon as it is evaluating a plan (so it holds a RUNNING trial)."""
    time.sleep(delay)
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise AssertionError("the worker ended before it was killed: " + proc.stderr.read()[-2000:])
        if (busy / str(proc.pid)).exists():
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            return
        time.sleep(0.005)
    raise AssertionError("the worker never ran a trial to be killed in")


def _run_workers(storage: str, log: Path, env: dict, trials: int = 30, kills: int = 2, no_lock: bool = False,
                 seed: int = 0) -> tuple[list, list]:
    """Three workers; worker 0 killed ``kills`` times mid-trial at random moments (and started again each time).

    Returns:
        (numbers of the trials the killed workers were running, the timing dicts the workers printed)
    """
    busy = log.parent / "busy"
    busy.mkdir(exist_ok=True)
    code = WORKER.format(tests=str(TESTS), log=str(log), storage=storage, trials=trials, no_lock=no_lock,
                         busy=str(busy))
    procs = [_start(code, s, env) for s in (0, 1, 2)]
    rng = random.Random(seed)
    pids = []
    for k in range(kills):
        _kill_mid_trial(procs[0], busy, rng.uniform(0.1, 0.8))
        pids.append(procs[0].pid)
        procs[0] = _start(code, 10 + k, env)  # the same command again
    timings = []
    for p in procs:
        out, err = p.communicate(timeout=180)
        assert p.returncode == 0, err[-3000:]
        timings.append(json.loads(out.strip().splitlines()[-1]))
    from optuna.trial import TrialState

    killed = [t.number for t in _trials(storage) if t.state == TrialState.FAIL
              and (t.user_attrs.get("worker") or {}).get("pid") in pids and not t.user_attrs.get("mixq_surplus")]
    assert len(killed) == kills, f"{kills} kills mid-trial, but the trials of the killed workers that failed: {killed}"
    return killed, timings


def _check_study(storage: str, log: Path, killed: list, trials: int = 30) -> None:
    from optuna.trial import TrialState

    ts = _trials(storage)
    done = [t for t in ts if t.state == TrialState.COMPLETE]
    assert len(done) == trials, f"{len(done)} finished trials, asked for {trials}"
    for t in done:  # every finished trial's values are the ones its plan gives
        a = c_space().from_params(t.params)
        info = t.user_attrs["mixq"]
        assert info["latency_ms"] == pytest.approx(c_latency(a))
        expected = c_metric(a) if info["metric"] is not None else 0.0
        assert t.values == [pytest.approx(expected)]
    failed = [t for t in ts if t.state == TrialState.FAIL]
    assert {t.number for t in failed if not t.user_attrs.get("mixq_surplus")} == set(killed)
    retried = {t.user_attrs.get("retry_of") for t in ts if t.user_attrs.get("retry_of") is not None}
    assert retried == set(killed), "a killed worker's trial was not re-queued exactly once"
    for n in killed:  # the survivors (or the restarted worker) ran the killed plan to the end
        orig = next(t for t in ts if t.number == n)
        retry = [t for t in ts if t.user_attrs.get("retry_of") == n]
        # a trial killed while its plan was being drawn is retried with the choices it had made (Optuna draws the rest)
        assert len(retry) == 1 and retry[0].state == TrialState.COMPLETE
        assert orig.params.items() <= retry[0].params.items()
    assert not [t for t in ts if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    labels = [t.user_attrs.get("baseline") for t in done if t.user_attrs.get("baseline")]
    assert sorted(labels) == ["all-int8", "fp32", "greedy fallback"], "a baseline ran twice or not at all"
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    measured = [r for r in rows if "measured" in r]
    spans = sorted((r["t0"], r["t1"], r["pid"]) for r in measured)
    overlaps = [(a, b) for a, b in zip(spans, spans[1:]) if b[0] < a[1] and a[2] != b[2]]
    assert not overlaps, f"{len(overlaps)} latency measurements of different workers overlapped"
    keys = [json.dumps(sorted(r["measured"].items())) for r in measured]
    assert len(keys) - len(set(keys)) <= len(killed), "a plan was measured more than once in the study"


# ----------------------------------------------------------------------------- the tests
@pytest.mark.parametrize("backend", ["journal", "postgresql"])
def test_three_workers_one_killed_twice_finish_every_trial_once(tmp_path, backend, request):
    storage = str(tmp_path / "w.journal") if backend == "journal" else request.getfixturevalue("pg_url")
    log = tmp_path / "log.jsonl"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MIXQ_LATENCY_LOCK": str(tmp_path / "latency.lock"),
           "OMP_NUM_THREADS": "1"}
    killed, timings = _run_workers(storage, log, env, seed=1 if backend == "journal" else 2)
    assert len(killed) == 2
    _check_study(storage, log, killed)
    assert sum(t["trials"] for t in timings) >= 25  # the rest ran in the killed sessions or were retried
    assert sum(t["latencies_reused"] for t in timings) > 0, "no worker reused another's measurement"


def test_without_the_lock_measurements_overlap(tmp_path):
    """The check of the kill test sees overlapping measurements when the lock is off (so it can fail)."""
    log = tmp_path / "log.jsonl"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MIXQ_LATENCY_LOCK": str(tmp_path / "latency.lock"),
           "OMP_NUM_THREADS": "1"}
    storage = str(tmp_path / "w.journal")
    _run_workers(storage, log, env, trials=20, kills=0, no_lock=True)
    with pytest.raises(AssertionError, match="overlapped"):
        _check_study(storage, log, [], trials=20)


def test_a_study_refuses_latencies_of_another_engine_setup(tmp_path):
    storage = open_storage(str(tmp_path / "s.journal"), tmp_path / "s.journal")
    kw = dict(storage=storage, study_name="s", sampler="random")
    run_search(c_space(), c_metric, c_latency, 4, Budget.parse("0.9x"), latency_setup={"engine": "ort 1.32"}, **kw)
    with pytest.raises(ConfigError, match=r"another setup \(engine=ort 1.32\).*engine=ort 1.99"):
        run_search(c_space(), c_metric, c_latency, 6, Budget.parse("0.9x"), latency_setup={"engine": "ort 1.99"}, **kw)


def test_a_trial_whose_heartbeat_stopped_is_failed_and_its_plan_re_queued(pg_url):
    """A worker on another machine cannot be checked by pid: its heartbeat tells (PostgreSQL, 1 s interval)."""
    import optuna
    from optuna.trial import TrialState

    storage = open_storage(pg_url, Path("unused"), heartbeat_s=1)
    space = c_space()
    run_search(space, c_metric, c_latency, 3, Budget.parse("0.9x"), storage=storage, study_name="w", sampler="random")
    study = optuna.load_study(study_name="w", storage=storage)
    lost = study.ask()  # a worker elsewhere: it took a trial, beat once, and died
    plan = space.suggest(lost)
    lost.set_user_attr("worker", {"host": "another-machine", "pid": 1, "start": "1"})
    storage.record_heartbeat(lost._trial_id)
    time.sleep(3.5)
    res = run_search(space, c_metric, c_latency, 6, Budget.parse("0.9x"), storage=storage, study_name="w",
                     sampler="random")
    ts = optuna.load_study(study_name="w", storage=storage).get_trials(deepcopy=False)
    assert ts[lost.number].state == TrialState.FAIL
    retry = [t for t in ts if t.user_attrs.get("retry_of") == lost.number]
    assert len(retry) == 1 and retry[0].state == TrialState.COMPLETE and space.from_params(retry[0].params) == plan
    assert len(res.records) == 6


# ----------------------------------------------------------------------------- the command
def _cmd(run_dir: Path, *extra: str) -> list[str]:
    from test_search_cli import SPECS

    return ["search", *SPECS, "--run-dir", str(run_dir), "--runs", "20", "--rounds", "2", "--retime-seconds", "0.05",
            "--no-progress", "--budget", "0.8x", "--no-random-baseline", *extra]


def test_the_command_with_two_workers_finishes_the_study_and_reports_each_worker(tmp_path, monkeypatch):
    from mixq.cli import main

    monkeypatch.setenv("MIXQ_LATENCY_LOCK", str(tmp_path / "latency.lock"))
    monkeypatch.setenv("PYTHONPATH", f"{ROOT}{os.pathsep}{TESTS}")
    assert main(_cmd(tmp_path / "run", "--trials", "12", "--workers", "2")) == 0
    out = json.loads((tmp_path / "run" / "search.json").read_text())
    assert [w["worker"] for w in out["workers"]] == [0, 1] and all("returncode" not in w for w in out["workers"])
    assert len(out["search"]["records"]) == 12 and len({r["number"] for r in out["search"]["records"]}) == 12
    assert sum(w["trials"] for w in out["workers"]) == 12


def test_bad_worker_input(tmp_path, capsys, monkeypatch):
    from mixq.cli import main

    monkeypatch.setenv("MIXQ_LATENCY_LOCK", str(tmp_path / "latency.lock"))
    assert main(_cmd(tmp_path / "a", "--join")) == 2
    err = capsys.readouterr().err
    assert "--join: there is no study 'test_search_cli-0.8x'" in err and "without --join" in err
    assert main(_cmd(tmp_path / "a", "--workers", "0")) == 2
    assert "--workers must be at least 1, but got 0" in capsys.readouterr().err
    assert main(_cmd(tmp_path / "a", "--join", "--storage", "postgresql://me:s3cret@127.0.0.1:1/db")) == 2
    err = capsys.readouterr().err
    assert "does not open" in err and "me:***@127.0.0.1:1/db" in err and "s3cret" not in err
    specs = ["--eval", "test_search_cli:other_eval_data"]
    assert main(_cmd(tmp_path / "b", "--trials", "3")) == 0  # a study of this model and data
    capsys.readouterr()
    assert main([*_cmd(tmp_path / "b", "--trials", "3", "--join"), *specs]) == 2
    assert "the search-split data" in capsys.readouterr().err
    cores = len(os.sched_getaffinity(0))
    main([*_cmd(tmp_path / "c", "--workers", str(cores + 1), "--budget", "fast")])
    assert f"--workers {cores + 1} is more than the {cores} core(s)" in capsys.readouterr().err
