"""Several processes on one study (``mixq search --workers N`` and ``--join``): start and collect the local
workers, pin each to a core, and the body of a joining worker.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from mixq.search_prep import (CACHE, JOURNAL, _say, calibrated_model, check_study_before_work, engine_latency, engine_runner,
                              fingerprint_parts, plan_of, ratio_mode, recorded_fp32_ms, search_latency, study_name)


def latency_setup(lat, opts) -> dict:
    """What a latency of this search depends on: a study refuses latencies measured with anything else."""
    mode = {"ratio_to_fp32_rounds": opts.ratio_rounds} if ratio_mode(opts) else {}
    return {**lat.setup.to_dict(), "runs": opts.runs, "warmup": lat.warmup, **mode}


def start_local_workers(d: Path, opts, storage_text: str) -> list:
    """Start workers 1 .. N-1 of ``--workers N``: the same command with ``--join``, one core each.

    Returns:
        the processes (``subprocess.Popen``; their stdout's last line is their timing as JSON).
    """
    import subprocess

    argv, skip = [], False
    for a in opts.argv:
        if skip:
            skip = False
            continue
        if a in ("--workers", "--worker-index", "--storage", "--run-dir"):
            skip = True
            continue
        if a.split("=")[0] in ("--workers", "--worker-index", "--storage", "--run-dir") or a in ("--fresh", "--join"):
            continue
        argv.append(a)
    storage = opts.storage if opts.storage is not None else str(d / JOURNAL)
    root = str(Path(__file__).resolve().parents[1])  # the workers run this very mixq, wherever it was imported from
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": path}
    procs = []
    for k in range(1, opts.workers):
        cmd = [sys.executable, "-m", "mixq.cli", *argv, "--run-dir", str(d), "--storage", storage, "--join",
               "--worker-index", str(k), "--no-progress"]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
    _say(f"[4/5] started {len(procs)} more worker process(es) on the study ({storage_text}): pids "
         f"{', '.join(str(p.pid) for p in procs)}")
    return procs


def collect_workers(procs: list) -> list:
    """Wait for the workers; their timings. A worker that failed is reported, its trials were re-queued."""
    out = []
    for k, p in enumerate(procs, start=1):
        stdout, stderr = p.communicate()
        if p.returncode != 0:
            print(f"mixq: warning: worker {k} (pid {p.pid}) ended with status {p.returncode}: "
                  f"{stderr.strip().splitlines()[-1] if stderr.strip() else ''}", file=sys.stderr)
            out.append({"worker": k, "pid": p.pid, "returncode": p.returncode})
            continue
        try:
            out.append({"worker": k, "pid": p.pid, **json.loads(stdout.strip().splitlines()[-1])})
        except (ValueError, IndexError):
            out.append({"worker": k, "pid": p.pid, "returncode": p.returncode})
    return out


def pin(index: int) -> None:
    """One intra-op thread for torch, and (Linux; ``index >= 0``) one core for the process: worker k on core k."""
    import torch

    torch.set_num_threads(1)
    if index >= 0 and hasattr(os, "sched_setaffinity"):
        cores = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cores[index % len(cores)]})


def join(task, d: Path, backend: str, opts, storage: Any, storage_text: str) -> dict:
    """``--join``: work on an existing study until it holds ``--trials`` finished trials; print the timing.

    The calibrated model comes from ``RUN/search-cache/calibrated`` (what the first worker saved) or is made
    there (another machine). Nothing else is written to the run folder; the study holds the results.

    Raises:
        ConfigError: the study does not exist, or was made for another model / data / backend (fingerprint).
    """
    from mixq.evaluate import evaluate_plan
    from mixq.search import SearchSpace, run_search
    from mixq.search.workers import LatencyLock

    name = study_name(task.name, opts)
    pin(opts.worker_index if opts.worker_index else -1)  # a --join of its own keeps the cores it was given
    search_data = task.search_fn() if task.search_fn is not None else task.eval_fn()
    model, calib = task.model_fn(), task.calib_fn()
    parts = fingerprint_parts(task, model, calib, search_data, backend, opts)
    check_study_before_work(storage, name, parts, storage_text)
    cache = d / CACHE
    cache.mkdir(parents=True, exist_ok=True)
    opts.progress = False
    q = calibrated_model(model, calib, backend, opts, cache)
    space = SearchSpace.build(q.mixq.kinds, backend, opts.formats)
    lat = engine_latency(q, calib, opts)
    timed = search_latency(lat, space, opts, recorded_fp32_ms(storage, name))
    runner = engine_runner(q, lat, opts)

    def metric_of(a: dict) -> float:
        return evaluate_plan(q, plan_of(a, backend, opts), search_data, task.metric_fn, engine=runner).metric

    # each worker its own sampler seed: equal seeds on one history would propose equal plans
    seed = opts.seed + 1000 * opts.worker_index if opts.worker_index else opts.seed + os.getpid()
    res = run_search(space, metric_of, timed, opts.trials, budget=opts.budget, front=opts.front, sampler=opts.sampler,
                     seed=seed, storage=storage, study_name=name, fingerprint=parts, storage_text=storage_text,
                     exclusive=False, latency_setup=latency_setup(lat, opts), lock=LatencyLock())
    print(json.dumps(res.timing), flush=True)
    return res.timing
