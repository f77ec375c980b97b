"""What ``mixq search`` starts from (torch side): its fingerprint and caches, the calibrated model, the sensitivity
(scanned or imported), the engine latency model, and the budget checked against what was measured.

``mixq.search_run`` runs the stages in order; ``mixq.search_join`` adds worker processes. Everything here is
cached in ``RUN/search-cache/`` under one fingerprint, so a rerun after a kill skips what is done.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Optional

from mixq.errors import ConfigError

CACHE = "search-cache"
EVALUATE_MODES = ("simulation", "engine")  # where a plan's metric is measured (--evaluate); the first is the default
JOURNAL = "search-study.journal"


def _say(text: str) -> None:
    print(text, flush=True)


def _example_batch(batch):
    return tuple(t[:1] for t in batch) if isinstance(batch, (tuple, list)) else batch[:1]


def study_name(task_name: str, opts) -> str:
    """The study name: ``--study`` or ``<task>-<budget>`` (``-front`` with --front)."""
    if opts.study:
        return opts.study
    b = opts.budget
    text = "front" if b is None else (f"{b.value:g}ms" if b.unit == "ms" else f"{b.value:g}x")
    return f"{task_name}-{text}" + ("-front" if opts.front and b is not None else "")


def fingerprint_parts(task, model, calib, search_data, backend: str, opts) -> dict:
    """What the caches and the study depend on, each part hashed on its own (a mismatch says what changed)."""
    import onnxruntime

    from mixq.latency.stats import cpu_model
    from mixq.sensitivity.store import digest, fingerprint

    parts = fingerprint(model, calib, search_data, task.metric_fn, {})
    parts.pop("settings", None)
    parts.update({"task": task.name, "backend": backend, "formats": ",".join(opts.formats),
                  "calib_method": opts.calib_method,
                  "latency": digest(onnxruntime.__version__, cpu_model(), 1, "thread", opts.runs, str(opts.batch_axis)),
                  "budget": str(opts.budget) if opts.budget is not None else "none",
                  "objective": "metric+latency" if opts.front else "metric"})
    if ratio_mode(opts):  # absolute studies keep their fingerprint; relative ones made before ratio mode are refused
        parts["latency_mode"] = f"ratio to FP32, {opts.ratio_rounds} rounds"
    if opts.evaluate != "simulation":  # studies measured in the simulation keep their fingerprint
        parts["evaluate"] = opts.evaluate
    return parts


def _cache_parts(parts: dict) -> dict:
    return {k: v for k, v in parts.items() if k not in ("budget", "objective", "latency_mode", "evaluate")}


def ratio_mode(opts) -> bool:
    """Whether the study judges plans by their ratio to FP32 timed next to them (a relative budget)."""
    return opts.budget is not None and opts.budget.unit == "x"


def search_latency(lat, space, opts, reference_ms: Optional[float]):
    """What the study times a plan with: ``lat`` itself (absolute budget, or none), or, with a relative budget,
    its ratio to FP32 timed back to back with it (``RatioLatency``) in milliseconds of ``reference_ms``.

    Absolute milliseconds drift up to 2x under load on a shared machine; a ratio to an FP32 run made next to the
    plan does not, and ``ratio * reference <= budget * reference`` is the constraint the study records.
    """
    if not ratio_mode(opts):
        return lat
    from mixq.latency.base import RatioLatency
    from mixq.search import baselines

    return RatioLatency(lat, baselines.fp32(space), opts.ratio_rounds, reference_ms)


def recorded_fp32_ms(storage: Any, name: str) -> Optional[float]:
    """The FP32 latency an existing study's budget is relative to (None: no such study, or none recorded)."""
    from mixq.search.workers import FP32_ATTR

    try:
        v = storage.get_study_user_attrs(storage.get_study_id_from_name(name)).get(FP32_ATTR)
    except KeyError:
        return None
    return None if v is None else float(v)


def check_cache(folder: Path, parts: dict) -> None:
    """Refuse a cache folder made for another model / data / backend; create it when missing.

    Raises:
        ConfigError: naming the parts that differ.
    """
    from mixq.artifacts import write_atomic
    from mixq.search.storage import _PART_WORDS

    folder.mkdir(parents=True, exist_ok=True)
    p = folder / "fingerprint.json"
    want = _cache_parts(parts)
    if p.is_file():
        old = json.loads(p.read_text())
        changed = sorted(k for k in set(old) | set(want) if old.get(k) != want.get(k))
        if changed:
            raise ConfigError(f"{str(folder)!r} holds calibration, sensitivity and latencies of another search ("
                              + ", ".join(_PART_WORDS.get(k, k) for k in changed) + " changed); pass --fresh to "
                              "discard them, or use another --run-dir.")
    else:
        write_atomic(p, json.dumps(want, indent=1))


def check_study_before_work(storage: Any, name: str, parts: dict, storage_text: str) -> None:
    """Refuse an existing study made for another search, before anything expensive runs."""
    from mixq.search.storage import FINGERPRINT_ATTR, check_fingerprint

    try:
        sid = storage.get_study_id_from_name(name)
    except KeyError:
        return

    class _View:  # check_fingerprint reads these two attributes
        study_name = name
        user_attrs = storage.get_study_user_attrs(sid)
        trials = storage.get_all_trials(sid, deepcopy=False)

    if _View.user_attrs.get(FINGERPRINT_ATTR) is not None or _View.trials:
        check_fingerprint(_View, parts, storage_text)


def discard(storage: Any, names: list[str], cache: Path) -> None:
    """--fresh: delete the studies and the cache folder."""
    import optuna

    for n in names:
        try:
            optuna.delete_study(study_name=n, storage=storage)
        except KeyError:
            pass
    shutil.rmtree(cache, ignore_errors=True)


def calibrated_model(model, calib, backend: str, opts, cache: Path):
    """The model calibrated for every format of the space: loaded from the cache, or calibrated and saved."""
    import mixq
    from mixq.checkpoint import load_quantized, read_meta, save_quantized
    from mixq.plan import QuantPlan

    path = cache / "calibrated"
    if (path / "mixq.json").is_file():
        meta = read_meta(path)
        if meta["backend"] == backend and meta["calib_method"] == opts.calib_method and \
                set(opts.formats) <= set(meta["formats"]):
            _say(f"[1/5] calibrated model from {path}")
            return load_quantized(model, path, calib_data=calib)
    _say(f"[1/5] calibrating {', '.join(opts.formats)} ({backend}, {opts.calib_method}) ...")
    q = mixq.quantize(model, QuantPlan(backend=backend, default="fp32", calib_method=opts.calib_method),
                      calib_data=calib, formats=opts.formats, progress="calibrate" if opts.progress else None)
    save_quantized(q, path)
    return q


def weight_counts(q) -> dict:
    """Unit -> number of weights (0 for functional ops): the cost ModelOpt's effective bits count."""
    from mixq.quant.graph import units

    out = {}
    for name, m in units(q).items():
        w = getattr(m, "weight", None)
        out[name] = int(w.numel()) if w is not None and hasattr(w, "numel") else 0
    return {u: out.get(u, 0) for u in q.mixq.kinds}


def sensitivity(q, calib, search_data, task, cache: Path, opts) -> tuple[dict, dict, Any]:
    """One-at-a-time drops and Fisher scores per unit and format, on the search split (cached).

    With ``--evaluate engine`` the drops are measured where the study measures its plans: each unit alone on ONNX
    Runtime against FP32 there (``mixq scan --method engine``, its own store); the Fisher scores stay PyTorch's.
    """
    from mixq.sensitivity import scan

    engine = opts.evaluate == "engine"
    _say(f"[2/5] one-at-a-time sensitivity ({'on ONNX Runtime' if engine else 'fake-quant simulation'}) and Fisher "
         "proxy on the search split ...")
    table = scan(q, calib, search_data, task.metric_fn, modes="one-at-a-time", proxies=True, progress=opts.progress,
                 task_name=task.name, store=cache / ("scan-engine.jsonl" if engine else "scan.jsonl"), seed=0,
                 method="engine" if engine else "auto", batch_axis=opts.batch_axis)
    # seed 0, not the study's: the table serves every study
    drops, fisher = {}, {}
    for r in table.rows:
        if r.drop is not None:
            drops.setdefault(r.layer, {})[r.format] = float(r.drop)
        if r.fisher is not None:
            fisher.setdefault(r.layer, {})[r.format] = float(r.fisher)
    return drops, fisher, table


def imported_sensitivity(path: str, model, calib, search_data, task, backend: str, opts
                         ) -> tuple[dict, dict]:
    """Drops and Fisher scores from a ``mixq scan --split search`` table of this very model, data and backend.

    Raises:
        ConfigError: the file is not a sensitivity table, was made for another model / data / metric /
            backend / calibration method (fingerprint), or lacks a unit or format of the space.
    """
    from mixq.evaluate import eval_batches
    from mixq.sensitivity.store import digest, fingerprint

    try:
        data = json.loads(Path(path).read_text())
        rows, fp = data["rows"], data["fingerprint"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"--sensitivity {path!r} is not a sensitivity table written by `mixq scan` ({e}).") from None
    settings = {"backend": backend, "calib_method": opts.calib_method, "quant_mode": "auto", "proxy_data": "calib",
                "seed": 0}
    parts = fingerprint(model, calib, eval_batches(search_data), task.metric_fn, settings)
    want = digest(parts)
    engine = digest({**parts, "settings": digest({**settings, "evaluate": "engine"})})  # `mixq scan --method engine`
    if fp not in (want, engine):
        raise ConfigError(f"--sensitivity {path!r} was made for another model, data, metric, backend or calibration "
                          f"(fingerprint {fp}, this search needs {want}); make it with `mixq scan --example "
                          f"{task.name} --split search --backend {backend} --calib-method {opts.calib_method}` "
                          "(seed 0), or leave --sensitivity out and the search scans itself.")
    drops, fisher = {}, {}
    for r in rows:
        if r.get("drop") is not None:
            drops.setdefault(r["layer"], {})[r["format"]] = float(r["drop"])
        if r.get("fisher") is not None:
            fisher.setdefault(r["layer"], {})[r["format"]] = float(r["fisher"])
    missing = [f for f in opts.formats if not any(f in per for per in drops.values())]
    if missing:
        raise ConfigError(f"--sensitivity {path!r} has no drops for format(s) {', '.join(missing)}; it holds "
                          f"{', '.join(sorted({f for per in drops.values() for f in per}))}. Scan those formats too.")
    return drops, fisher


def check_budget(budget, limit: float, fp32_ms: float, measured: dict) -> None:
    """A budget below the fastest plan measured, or at/above FP32, is refused before the study.

    Raises:
        ConfigError: naming the fastest plan (and its latency) or the plans faster than FP32.
    """
    name, ms = min(measured.items(), key=lambda kv: kv[1])
    if limit < ms:
        raise ConfigError(f"budget {budget} ({limit:.3f} ms) is below the fastest plan measured: {name} at {ms:.3f} ms "
                          f"({ms / fp32_ms:.2f}x of FP32 {fp32_ms:.3f} ms); no plan is known to meet it. Give a "
                          f"budget of at least {ms:.3f} ms ({ms / fp32_ms:.2f}x).")
    if limit >= fp32_ms:
        faster = sorted(((n, m) for n, m in measured.items() if m < fp32_ms and not n.startswith("single ")),
                        key=lambda kv: kv[1])
        listed = "; ".join(f"{n} {m:.3f} ms ({m / fp32_ms:.2f}x)" for n, m in faster[:5]) or "none measured"
        raise ConfigError(f"budget {budget} ({limit:.3f} ms) is at or above FP32 latency ({fp32_ms:.3f} ms): it is "
                          f"trivially met by FP32, which loses nothing. Faster plans: {listed}. Give a budget below "
                          f"FP32, e.g. {0.9 * fp32_ms:.3f}ms or 0.9x.")


def engine_latency(q, calib, opts):
    """The ONNX Runtime latency model of the calibrated model ``q``: a batch of one, the float graph traced once."""
    from mixq.cli_deploy import float_graph_of
    from mixq.latency.ort import OrtLatency

    class _Args:
        batch_axis = opts.batch_axis

    return OrtLatency(q, _example_batch(calib[0]), runs=opts.runs, float_graph=float_graph_of(q, calib, _Args))


def plan_of(assignment: dict, backend: str, opts):
    """The plan of one assignment (unit -> format) of the space."""
    from mixq.plan import QuantPlan

    return QuantPlan(backend=backend, default="fp32", layers={u: f for u, f in assignment.items() if f != "fp32"},
                     calib_method=opts.calib_method)


def engine_runner(q, lat, opts):
    """``--evaluate engine``: plans evaluated on ONNX Runtime on every core this process has (None: simulation)."""
    if opts.evaluate != "engine":
        return None
    from mixq.evaluate import EngineRunner

    return EngineRunner(q, lat.float_graph)
