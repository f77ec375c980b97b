"""Re-time the plans a search reports in a fresh process, each interleaved with FP32.

    python -m mixq.search_retime JOB.json OUT.json

``JOB.json`` names the ONNX files (FP32 and each plan, as ``mixq search`` exported them from the saved
calibrated model), the example inputs (``.npy``), and the timing settings (threads, runs, warm-up,
rounds, clock, the engine's disabled optimizers). Every session is built with ``mixq.engine.ort.build``
(what the search measured and what deployment runs), anew in every round; each round times FP32 and
then the plan, back to back, so a slow spell of a shared machine hits both. A plan's figures are medians over rounds: its
latency, and its ratio to the FP32 run next to it. Nothing from the parent process is reused: no
session, no cache, no warmed-up allocator.

Imports no torch.
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Optional

from mixq.errors import MixqError


class RetimeError(MixqError, RuntimeError):
    """The fresh-process re-timing failed (its error output is in the message)."""


def retime(job: Mapping[str, Any]) -> dict:
    """Time every plan of ``job`` against FP32, interleaved (run in the fresh process).

    Args:
        job: {"fp32": onnx path, "plans": {name: onnx path}, "inputs": [npy paths], "threads", "runs",
            "warmup", "rounds", "clock", "disabled_optimizers" (None: the engine's default), "min_seconds" (each
            measurement runs at least this long: ``runs`` is raised to fit)}.

    Returns:
        {"fp32_ms": median over every FP32 run, "plans": {name: {"median_ms", "rounds_ms", "fp32_rounds_ms",
        "ratio", "ratios"}}, "seconds"}.
    """
    import numpy as np

    from mixq.engine.ort import build
    from mixq.latency.stats import time_runs

    t0 = time.perf_counter()
    inputs = [np.load(p) for p in job["inputs"]]
    threads, runs, warmup = int(job["threads"]), int(job["runs"]), int(job["warmup"])
    clock, disabled = job.get("clock", "thread"), job.get("disabled_optimizers")

    def engine(path: str):
        eng = build(path, threads, disabled_optimizers=disabled)
        feeds = eng.feed(inputs if len(inputs) > 1 else inputs[0])
        return lambda: eng.session.run(None, feeds)

    plans = dict(job["plans"])
    # A measurement lasts at least min_seconds: a few runs of a 0.1 ms model are one scheduler tick.
    probe = time_runs(engine(job["fp32"]), 5, warmup, clock).median_ms
    runs = max(runs, int(float(job.get("min_seconds", 0.0)) * 1e3 / max(probe, 1e-3)) + 1)
    per: dict[str, dict[str, list]] = {n: {"plan": [], "fp32": []} for n in plans}
    for r in range(int(job["rounds"])):
        # New sessions every round: a session's speed can sit ~40% off another's of the same model for its whole
        # life (measured on the MNIST ResNet, 0.065 vs 0.09 ms), so the median over rounds is over sessions too.
        fp32 = engine(job["fp32"])
        names = list(plans) if r % 2 == 0 else list(plans)[::-1]
        for n in names:
            plan = engine(plans[n])
            a = time_runs(fp32, runs, warmup, clock).median_ms
            b = time_runs(plan, runs, warmup, clock).median_ms
            del plan
            per[n]["fp32"].append(a)
            per[n]["plan"].append(b)
    out = {}
    for n, d in per.items():
        ratios = [b / a for a, b in zip(d["fp32"], d["plan"])]
        out[n] = {"median_ms": statistics.median(d["plan"]), "rounds_ms": d["plan"], "fp32_rounds_ms": d["fp32"],
                  "ratio": statistics.median(ratios), "ratios": ratios}
    all_fp32 = [x for d in per.values() for x in d["fp32"]]
    return {"fp32_ms": statistics.median(all_fp32) if all_fp32 else None, "plans": out, "runs": runs,
            "seconds": time.perf_counter() - t0}


def retime_in_fresh_process(job: Mapping[str, Any], folder: Path, timeout: Optional[float] = None) -> dict:
    """Write ``job`` to ``folder``, run ``python -m mixq.search_retime`` on it, and return its result.

    Raises:
        RetimeError: the child failed or wrote no result.
    """
    from mixq.artifacts import write_atomic

    job_path, out_path = folder / "retime-job.json", folder / "retime.json"
    write_atomic(job_path, json.dumps(dict(job), indent=1))
    out_path.unlink(missing_ok=True)
    res = subprocess.run([sys.executable, "-m", "mixq.search_retime", str(job_path), str(out_path)],
                         capture_output=True, text=True, timeout=timeout)
    if res.returncode != 0 or not out_path.is_file():
        raise RetimeError(f"the fresh-process re-timing failed (exit {res.returncode}): "
                          f"{res.stderr.strip()[-1500:] or res.stdout.strip()[-500:]}")
    return json.loads(out_path.read_text())


def main(argv: Optional[list[str]] = None) -> int:
    from mixq.artifacts import write_atomic

    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m mixq.search_retime JOB.json OUT.json", file=sys.stderr)
        return 2
    job = json.loads(Path(argv[0]).read_text())
    write_atomic(argv[1], json.dumps(retime(job), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
