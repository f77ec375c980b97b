"""Benchmark the sensitivity scan: fast suffix replay vs the naive loop, proxies vs FP32 passes, memory.

    python bench/bench_scan.py                                   # both examples, INT8, both modes
    python bench/bench_scan.py --examples mnist_resnet --modes one-at-a-time --repeats 3

For each example and exact mode it times the exact stage (reference evaluation + one result per
layer) with ``method="fast"`` and with ``method="naive"`` (N+1 full evaluations: ``mixq.quantize.applied`` and
a full forward per layer), alternating the order between repeats, and checks that both produce
the same per-sample scores; "fast/(N+1) FP32 evals" compares the fast scan with a hand-written loop
that calls the task's evaluation N+1 times. Proxies are timed against one FP32 evaluation pass of the float model
(``mixq.evaluate.evaluate``). Memory: in fresh processes, the peak resident memory above what the process held before the
model existed, while running one FP32 evaluation (model load included) and while running a
one-at-a-time scan (which loads, prepares and calibrates the model itself); MiniLM by default. Prints a table and writes JSON
(``reports/bench_scan.json``). Wall-clock numbers depend on the machine and its load; the load
average is recorded with them. Torch runs one intra-op thread (``--threads``), as everywhere in mixq's timing.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _exact_seconds(table, mode: str) -> float:
    return sum(v for k, v in table.timing.items() if k.startswith(mode + ":") and k.endswith("_s"))


def _fp32_eval_seconds(task, evalb, repeats: int = 3) -> float:
    from mixq.evaluate import evaluate

    model = task.model_fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        evaluate(model, evalb, task.metric_fn)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_example(name: str, modes: list[str], repeats: int, fmt: str) -> dict:
    from mixq.sensitivity import scan
    from mixq.task import Task

    task = Task.example(name)
    calib, evalb = task.calib_fn(), task.eval_fn()
    out = {"example": name, "format": fmt, "fp32_eval_s": _fp32_eval_seconds(task, evalb), "modes": {}}
    common = dict(formats=[fmt], proxies=False, bootstrap=0, progress=False)
    for mode in modes:
        runs = {"fast": [], "naive": []}
        tables = {}
        for rep in range(repeats):
            for method in (("fast", "naive") if rep % 2 == 0 else ("naive", "fast")):
                load = os.getloadavg()[0]
                t = scan(task.model_fn, calib, evalb, task.metric_fn, modes=mode, method=method, task_name=name,
                         **common)
                runs[method].append({"seconds": _exact_seconds(t, mode), "load": load})
                tables[method] = t
                print(f"  {name} {mode} {method}: {runs[method][-1]['seconds']:.1f} s (load {load:.1f})", flush=True)
        key = "drop" if mode == "one-at-a-time" else "recovered"
        same = all(getattr(a, key) == getattr(b, key) and a.layer == b.layer
                   for a, b in zip(tables["fast"].rows, tables["naive"].rows))
        fast = statistics.median(r["seconds"] for r in runs["fast"])
        naive = statistics.median(r["seconds"] for r in runs["naive"])
        out["units"] = len(tables["fast"].rows)
        out["modes"][mode] = {"fast_s": fast, "naive_s": naive, "ratio": fast / naive, "identical_results": same,
                              "runs": runs, "naive_evaluations": out["units"] + 1}
    for data in ("calib", "eval"):
        load = os.getloadavg()[0]
        t = scan(task.model_fn, calib, evalb, task.metric_fn, modes="none", proxies=True, proxy_data=data,
                 task_name=name, formats=[fmt], progress=False, bootstrap=0)
        out[f"proxies_{data}_s"] = t.timing["proxies_s"]
        out[f"proxies_{data}_per_fp32_eval"] = t.timing["proxies_s"] / out["fp32_eval_s"]
        out[f"proxies_{data}_load"] = load
        print(f"  {name} proxies on {data}: {t.timing['proxies_s']:.1f} s", flush=True)
    return out


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class _PeakRSS:
    """Samples the resident set size every few milliseconds while the block runs."""

    def __enter__(self):
        import threading

        self.peak, self._stop = _rss_mb(), threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _rss_mb())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, _rss_mb())


def memory_probe(name: str, what: str, fmt: str) -> None:
    """In a fresh process: RSS before the model exists, and the peak while evaluating or scanning."""
    import ctypes
    import gc

    from mixq.evaluate import evaluate
    from mixq.task import Task

    task = Task.example(name)
    calib, evalb = task.calib_fn(), task.eval_fn()
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap (data loading) back, for a clean baseline
    except OSError:
        pass
    base = _rss_mb()
    with _PeakRSS() as peak:
        if what == "fp32":
            evaluate(task.model_fn(), evalb, task.metric_fn)
        else:
            from mixq.sensitivity import scan

            scan(task.model_fn, calib, evalb, task.metric_fn, formats=[fmt], modes="one-at-a-time",
                 proxies=what == "scan+proxies", bootstrap=0, progress=False)
    print(json.dumps({"before_model_mb": base, "peak_mb": peak.peak, "held_mb": peak.peak - base}))


def bench_memory(name: str, fmt: str) -> dict:
    import torch

    res = {}
    for what in ("fp32", "scan", "scan+proxies"):
        r = subprocess.run([sys.executable, __file__, "--memory-probe", what, "--examples", name, "--format", fmt,
                            "--threads", str(torch.get_num_threads())],
                           capture_output=True, text=True, cwd=ROOT)
        if r.returncode != 0:
            raise RuntimeError(r.stderr)
        res[what] = json.loads(r.stdout.strip().splitlines()[-1])
        print(f"  {name} memory {what}: {res[what]}", flush=True)
    for k in ("scan", "scan+proxies"):
        res[f"{k}_over_fp32_held"] = res[k]["held_mb"] / res["fp32"]["held_mb"]
        res[f"{k}_over_fp32_peak"] = res[k]["peak_mb"] / res["fp32"]["peak_mb"]
    return res


def table_text(results: list[dict]) -> str:
    head = ["example", "units", "FP32 eval s", "mode", "naive s", "fast s", "fast/naive", "fast/(N+1) FP32 evals",
            "identical",
            "proxies s (calib)", "proxies / FP32 eval", "proxies s (eval)", "proxies / FP32 eval"]
    rows = []
    for r in results:
        for mode, m in r["modes"].items():
            rows.append([r["example"], str(r["units"]), f"{r['fp32_eval_s']:.1f}", mode, f"{m['naive_s']:.1f}",
                         f"{m['fast_s']:.1f}", f"{m['ratio']:.2f}",
                         f"{m['fast_s'] / (m['naive_evaluations'] * r['fp32_eval_s']):.2f}",
                         "yes" if m["identical_results"] else "NO",
                         f"{r['proxies_calib_s']:.1f}", f"{r['proxies_calib_per_fp32_eval']:.2f}",
                         f"{r['proxies_eval_s']:.1f}", f"{r['proxies_eval_per_fp32_eval']:.2f}"])
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([fmt(head)] + [fmt(r) for r in rows])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--examples", default="mnist_resnet,minilm")
    p.add_argument("--modes", default="one-at-a-time,leave-one-out")
    p.add_argument("--format", default="int8")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--memory", default="minilm", help="examples to measure memory on ('' for none)")
    p.add_argument("--out", default=str(ROOT / "reports" / "bench_scan.json"))
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--memory-probe", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    import torch

    torch.set_num_threads(a.threads)  # the machine is shared: one intra-op thread gives stable medians
    if a.memory_probe:
        memory_probe(a.examples, a.memory_probe, a.format)
        return 0

    results = []
    for name in [x for x in a.examples.split(",") if x]:
        print(f"{name}:", flush=True)
        r = bench_example(name, [m for m in a.modes.split(",") if m], a.repeats, a.format)
        if name in a.memory.split(","):
            r["memory"] = bench_memory(name, a.format)
        results.append(r)
    print(table_text(results))
    for r in results:
        if "memory" in r:
            m = r["memory"]
            print(f"{r['example']} memory held (peak RSS above the process before the model exists): FP32 evaluation "
                  f"{m['fp32']['held_mb']:.0f} MB; one-at-a-time scan {m['scan']['held_mb']:.0f} MB "
                  f"({m['scan_over_fp32_held']:.2f}x); with proxies {m['scan+proxies']['held_mb']:.0f} MB "
                  f"({m['scan+proxies_over_fp32_held']:.2f}x). Whole-process peaks: {m['fp32']['peak_mb']:.0f} / "
                  f"{m['scan']['peak_mb']:.0f} / {m['scan+proxies']['peak_mb']:.0f} MB.")
    meta = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d %H:%M")}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
