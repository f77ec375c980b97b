"""scan(): calibrate once, measure every (layer, format) exactly and by proxy, return a SensitivityTable.

Order of work: validate the inputs (before any expensive step), fingerprint, prepare and
calibrate the model once for all formats (or take a model mixq already calibrated), the proxy
pass, then each exact mode: a reference evaluation of its base, then one result per (layer,
format), each persisted as it finishes and scored by ``mixq.evaluate.score`` (one finite score
per evaluation sample).
"""
from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import numpy as np
from torch import nn

from mixq.evaluate import batch_size, count_samples, eval_batches, score
from mixq.formats import FORMATS, get_backend
from mixq.quantize import QuantState, add_formats, calibrate, prepare
from mixq.sensitivity.errors import ScanError
from mixq.sensitivity.engine_scan import ENGINE_BACKENDS, EngineScanner
from mixq.sensitivity.exact import EXACT_MODES, LEAVE_ONE_OUT, ONE_AT_A_TIME, ExactScanner
from mixq.sensitivity.graphrun import release_free_memory, tensors_of
from mixq.sensitivity.proxies import proxy_scan
from mixq.sensitivity.selection import check_coverage, check_prepared, exact_modes, prepared_formats, select
from mixq.sensitivity.store import PartialFiles, ScanStore, callable_name, fingerprint, prepared_fingerprint
from mixq.sensitivity.table import SCAN_METHODS, LayerSensitivity, SensitivityTable, correlations, output_sqnr_db
from mixq.stats import paired_bootstrap_ci

PROXY_DATA = ("calib", "eval")


def _out_sqnr(ref: list, outs: list) -> float:
    sig = noise = 0.0
    for r, o in zip(ref, outs):
        for a, b in zip(tensors_of(r), tensors_of(o)):
            a = a.double()
            sig += float(a.square().sum())
            noise += float((b.double() - a).square().sum())
    return output_sqnr_db(sig, noise)


class _Progress:
    """A progress bar over (layer, format, batch) pieces, weighted by expected cost for the ETA."""

    def __init__(self, enabled: bool, desc: str, total: float, layers: int, batches: int) -> None:
        self.layers, self.batches = layers, batches
        self.done: dict[int, int] = {}
        self.bar = None
        if enabled and total > 0:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=desc, leave=True, dynamic_ncols=True,
                            bar_format="{desc}: {percentage:3.0f}%|{bar}| {postfix} [{elapsed}<{remaining}]")

    def step(self, weight: float, batch: int, text: str) -> None:
        self.done[batch] = self.done.get(batch, 0) + 1
        if self.bar is not None:
            self.bar.set_postfix_str(f"batch {batch + 1}/{self.batches}, {self.done[batch]}/{self.layers} layers, "
                                     f"{text}", refresh=False)
            self.bar.update(max(0.0, min(weight, self.bar.total - self.bar.n)))  # float sums may overshoot

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def scan(model: nn.Module | Callable[[], nn.Module], calib_data: Optional[Iterable], eval_data: Iterable,
         metric: Callable, *, backend: Optional[str] = None, formats: Optional[Sequence[str]] = None,
         layers: Optional[Sequence[str]] = None, modes: str | Sequence[str] = ONE_AT_A_TIME,
         proxies: bool = True, proxy_data: str = "calib", proxy_batch: Optional[int] = None,
         bootstrap: int = 1000, confidence: float = 0.95,
         calib_method: Optional[str] = None, method: str = "auto", store: Optional[str | Path] = None,
         fresh: bool = False, progress: bool = True, quant_mode: str = "auto", seed: int = 0,
         task_name: str = "", concrete_args: Optional[dict] = None, batch_axis: Optional[int] = 0) -> SensitivityTable:
    """Measure how much each layer costs in each format.

    Args:
        model: the float model, or a function returning it (then it is freed once prepared); or a
            model already prepared and calibrated by mixq (``mixq.quantize(..., formats=[...])`` or a
            loaded one): it is scanned as calibrated, never recalibrated, and its plan is restored after.
        calib_data: input batches; calibration runs once for all formats. With a prepared model they
            only feed the proxies (``proxy_data="calib"``) and may be None otherwise.
        eval_data: (inputs, targets) batches.
        metric: ``metric(outputs, targets) -> per-sample scores`` in percent, one per evaluation
            sample (see ``mixq.evaluate``).
        backend: backend whose schemes and placement the simulation follows (default "ort-cpu", or
            the prepared model's, which a different value contradicts).
        formats: formats to scan (default: every format the backend supports per layer; for a
            prepared model, the formats it was prepared for).
        layers: layer names to scan (default: all).
        modes: "one-at-a-time", "leave-one-out", "both", "none" or a list of modes.
        proxies: compute the SQNR / MSE / Fisher proxies.
        proxy_data: "calib" (default; proxies need no labels) or "eval".
        proxy_batch: samples per forward-backward of the proxy pass (default: a quarter of an
            evaluation batch, which keeps its memory near that of one FP32 evaluation). A memory
            knob only: the scores are sums over samples, so it is not part of the fingerprint.
        bootstrap: resamples for the intervals (0: no intervals).
        confidence: interval coverage.
        calib_method: activation calibration method (default "max", or the prepared model's).
        method: "auto" (fast suffix replay in FX mode, naive otherwise), "fast" or "naive" (the fake-quant
            simulation), or "engine": each entry's plan exported and run on ONNX Runtime (backend ort-cpu; the
            float graph is traced on the first calibration batch). The proxies stay in PyTorch.
        store: JSONL file for resumable results (None: in memory only). The table is also saved
            as ``sensitivity.json`` next to it.
        fresh: discard results already in ``store``.
        progress: show a progress bar.
        quant_mode: "auto", "fx" or "module" (how the model is prepared).
        seed: seed of the bootstrap and of the Fisher probes.
        task_name: a name for the report.
        concrete_args: FX tracing option (float models only).
        batch_axis: method "engine": the inputs' batch axis, exported as dynamic (None: static shapes).

    Returns:
        The SensitivityTable.

    Raises:
        ScanError / StaleScanError / UnsupportedFormatError / CalibrationError / EvaluationError /
        MixqError: bad input, or a prepared model that does not fit the scan (each message says what to change).
    """
    modes_todo = exact_modes(modes)
    if proxy_data not in PROXY_DATA:
        raise ScanError(f"proxy_data must be one of {', '.join(PROXY_DATA)}, got {proxy_data!r}.")
    if proxy_batch is not None and (isinstance(proxy_batch, bool) or not isinstance(proxy_batch, int)
                                    or proxy_batch < 1):
        raise ScanError(f"proxy_batch must be a positive number of samples or None, got {proxy_batch!r}.")
    if bootstrap < 0 or not 0.0 < confidence < 1.0:
        raise ScanError(f"`bootstrap >= 0` and `0 < confidence < 1` must hold, but got "
                        f"(bootstrap={bootstrap}, confidence={confidence}).")
    check_method(method, get_backend(backend).name if backend is not None else "ort-cpu")
    evalb = eval_batches(eval_data)
    if not isinstance(model, nn.Module):
        model = model()
    prepared = isinstance(getattr(model, "mixq", None), QuantState)
    calib = None if calib_data is None else list(calib_data)
    if prepared:
        backend, calib_method, quant_mode = check_prepared(model, backend, calib_method, quant_mode, concrete_args)
        if proxies and proxy_data == "calib" and calib is None:
            raise ScanError("the proxies run on calibration data (proxy_data='calib') but calib_data is None: pass "
                            "the calibration batches (the prepared model is not recalibrated), or use "
                            "proxy_data='eval' or proxies=False.")
    elif calib is None:
        raise ScanError("calib_data is None: a float model is calibrated by the scan, so pass calibration batches "
                        "(or pass a model already calibrated by mixq.quantize).")
    be = get_backend(backend or "ort-cpu")
    calib_method = calib_method or "max"
    check_method(method, be.name)  # again: a prepared model brings its own backend
    samples = count_samples([b[1] for b in evalb], [b[0] for b in evalb], metric)
    t_start = time.perf_counter()

    settings = {"backend": be.name, "calib_method": calib_method, "quant_mode": quant_mode,
                "proxy_data": proxy_data, "seed": seed}
    if method == "engine":  # engine drops are not the simulation's: their store is another (fast = naive, bit for bit)
        settings["evaluate"] = "engine"
    if prepared:
        parts = prepared_fingerprint(model, calib, evalb, metric, {**settings, "model": "prepared"})
    else:
        parts = fingerprint(model, calib, evalb, metric, settings)
    meta = {"task": task_name, "backend": be.name, "metric": callable_name(metric)}
    timing: dict[str, Any] = {}
    # The store is checked before anything expensive: stale results fail fast.
    with ScanStore(store, parts, fresh=fresh, meta=meta) as st, \
            _partials(Path(store).with_name(Path(store).name + ".partial") if store is not None else None,
                      st.created) as partials:
        # A prepared model gets its plan back: every pass below runs under mixq.quantize.applied.
        qmodel = model if prepared else prepare(model, be.name, quant_mode, concrete_args,
                                                example_inputs=calib[0] if calib else None)
        del model  # the caller may still hold it; the scan no longer needs it
        kinds = dict(qmodel.mixq.kinds)
        todo = select(kinds, be.name, prepared_formats(qmodel) if prepared and formats is None else formats, layers)
        if prepared:
            check_coverage(qmodel, todo)
        all_formats = [f for f in FORMATS if any(f in fs for fs in todo.values())]
        scanner = ExactScanner(qmodel, [b[0] for b in evalb], "auto" if method == "engine" else method)
        exact = scanner if method != "engine" else EngineScanner(  # the proxies keep the simulation's runner
            qmodel, [b[0] for b in evalb], calib[0] if calib else evalb[0][0], batch_axis)
        targets = [b[1] for b in evalb]
        stages = [(mode, base, todo if mode == ONE_AT_A_TIME else {u: [base] for u, fs in todo.items() if base in fs})
                  for mode in modes_todo for base in (["fp32"] if mode == ONE_AT_A_TIME else all_formats)]
        proxy_todo = _missing_proxies(st, todo) if proxies else {}
        if not prepared and (proxy_todo or any(_pending(st, mode, base, sub) is not None for mode, base, sub in stages)):
            # one calibration for every format, reused by every layer and every stage
            qmodel.mixq.calib_method = calib_method
            add_formats(qmodel, all_formats, calib_method)
            t0 = time.perf_counter()
            calibrate(qmodel, _trimmed(calib), calib_method)
            release_free_memory()
            timing["calibration_s"] = time.perf_counter() - t0
        if proxy_todo:
            # A backward holds several forwards' worth of activations: a quarter of an evaluation
            # batch at a time keeps the pass within the memory of one FP32 evaluation.
            micro = proxy_batch or max(1, (batch_size(evalb[0][0]) or 4) // 4)
            _run_proxies(st, qmodel, scanner, proxy_todo, calib if proxy_data == "calib" else [b[0] for b in evalb],
                         seed, micro, timing, progress)
        for mode, base, sub in stages:
            pending = _pending(st, mode, base, sub)
            if pending is not None:
                _run_exact(st, partials, exact, metric, targets, samples, mode, base, pending, timing, progress)
        timing["method"] = exact.method
        timing["total_s"] = time.perf_counter() - t_start
        table = _build(st, kinds, exact.order(kinds), todo, all_formats, modes_todo, bootstrap, confidence,
                       seed, task_name, be.name, callable_name(metric), timing, exact)
    if store is not None:
        table.save(Path(store).with_name("sensitivity.json"))
    return table


def check_method(method: str, backend: str) -> None:
    if method not in SCAN_METHODS:
        raise ScanError(f"method must be one of {', '.join(SCAN_METHODS)}, got {method!r}.")
    if method == "engine" and backend not in ENGINE_BACKENDS:
        raise ScanError(f"method 'engine' runs each plan on ONNX Runtime, which realises the backend "
                        f"{', '.join(ENGINE_BACKENDS)}, not {backend!r}; scan {backend!r} in the simulation "
                        "(method 'auto') or use the backend ort-cpu.")


def scan_task(task, **kwargs) -> SensitivityTable:
    """``scan`` on a ``mixq.task.Task`` (a built-in example or user specs)."""
    return scan(task.model_fn, task.calib_fn(), task.eval_fn(), task.metric_fn, task_name=task.name, **kwargs)


# --------------------------------------------------------------------- stages
@contextlib.contextmanager
def _partials(folder: Optional[Path], new_store: bool):
    """Partial outputs next to the results file; they belong to it, so a new file starts them over."""
    p = PartialFiles(folder)
    if new_store and folder is not None:
        p.clear()
        p = PartialFiles(folder)
    try:
        yield p
    finally:
        p.close()


def _trimmed(batches: list):
    """The batches, handing freed memory back to the OS after each (see ``release_free_memory``).

    Calibration is where a scan's resident memory peaked (MiniLM: 1.7x an FP32 evaluation without
    this, as the heap grew batch after batch); it costs a few percent of the scan's time.
    """
    for b in batches:
        yield b
        release_free_memory()


def _missing_proxies(st: ScanStore, todo: dict) -> dict[str, list[str]]:
    missing = {u: [f for f in fs if st.get("proxy", None, u, f) is None] for u, fs in todo.items()}
    return {u: fs for u, fs in missing.items() if fs}


def _pending(st: ScanStore, mode: str, base: str, todo: dict) -> Optional[dict[str, list[str]]]:
    """The (layer, format) pairs of a stage still to measure; None when the stage is complete."""
    pending = {u: [f for f in fs if st.get("exact", mode, u, f) is None] for u, fs in todo.items()}
    pending = {u: fs for u, fs in pending.items() if fs}
    if not pending and st.get("reference", mode, None, base) is not None:
        return None
    return pending


def _run_proxies(st: ScanStore, qmodel, scanner: ExactScanner, missing: dict, data: list, seed: int,
                 micro_batch: Optional[int], timing: dict, progress: bool) -> None:
    if progress:
        print(f"proxies: one forward-backward pass over {len(data)} batches for "
              f"{sum(map(len, missing.values()))} (layer, format) pairs", flush=True)
    res = proxy_scan(qmodel, data, missing, seed=seed, runner=scanner.runner, micro_batch=micro_batch)
    for (u, f), s in res.scores.items():
        st.add({"type": "proxy", "layer": u, "format": f, **s, "samples": res.samples})
    st.add({"type": "timing", "mode": "proxies", "seconds": res.seconds})
    timing["proxies_s"] = res.seconds


def _score(metric: Callable, outputs: list, targets: list, n: int) -> np.ndarray:
    """The metric's scores of one result: exactly ``n`` finite numbers (``mixq.evaluate.score``)."""
    return score(metric, outputs, targets, n)


def _run_exact(st: ScanStore, partials: PartialFiles, scanner: ExactScanner, metric: Callable, targets: list,
               samples: int, mode: str, base: str, pending: dict, timing: dict, progress: bool) -> None:
    ref_out, ref_s = scanner.reference(mode, base)
    ref_scores = _score(metric, ref_out, targets, samples)
    old = st.get("reference", mode, None, base)
    if old is None or old["scores"] != ref_scores.tolist():
        st.add({"type": "reference", "mode": mode, "format": base, "metric": float(ref_scores.mean()),
                "scores": ref_scores.tolist(), "seconds": ref_s})
    timing[f"{mode}:{base}:reference_s"] = ref_s
    order = scanner.order(pending)
    nb = len(targets)
    cost = {u: scanner.cost(u) / nb for u in order}
    total = sum(cost[u] for u in order for f in pending[u] for b in range(nb)
                if not partials.has(mode, base, u, f, b))
    fmts = base if mode == LEAVE_ONE_OUT else ",".join(sorted({f for fs in pending.values() for f in fs}))
    n_entries = sum(map(len, pending.values()))
    bar = _Progress(progress, f"{mode} {fmts}", total, n_entries, nb)
    spent = 0.0
    try:
        for fin in scanner.entries(mode, base, pending, ref_out, partials,
                                   lambda u, f, b: bar.step(cost[u], b, f"{u} {f}")):
            s = _score(metric, fin.outputs, targets, samples)
            st.add({"type": "exact", "mode": mode, "layer": fin.unit, "format": fin.fmt,
                    "metric": float(s.mean()), "scores": s.tolist(), "out_sqnr_db": _out_sqnr(ref_out, fin.outputs),
                    "seconds": fin.seconds, "method": scanner.method})
            partials.drop(mode, base, fin.unit, fin.fmt)
            spent += fin.seconds
    finally:
        bar.close()
    timing[f"{mode}:{base}:entries_s"] = spent
    timing[f"{mode}:{base}:entries"] = sum(map(len, pending.values()))


# --------------------------------------------------------------------- table
def _build(st: ScanStore, kinds: dict, order: list[str], todo: dict, formats: list[str], modes: list[str],
           bootstrap: int, confidence: float, seed: int, task: str, backend: str, metric: str,
           timing: dict, scanner: ExactScanner) -> SensitivityTable:
    # Results an earlier run stored for the same fingerprint are valid: show them too.
    modes = [m for m in EXACT_MODES if m in modes or any(r["mode"] == m for r in st.find("exact"))]
    reference: dict[str, float] = {}
    refs: dict[tuple[str, str], np.ndarray] = {}
    for r in st.find("reference"):
        refs[(r["mode"], r["format"])] = np.asarray(r["scores"])
        reference["fp32" if r["format"] == "fp32" else f"all:{r['format']}"] = r["metric"]
    rows, samples = [], 0
    for u in order:
        for f in todo.get(u, ()):
            row = LayerSensitivity(layer=u, kind=kinds[u], format=f)
            e = st.get("exact", ONE_AT_A_TIME, u, f)
            if e is not None:
                ref = refs[(ONE_AT_A_TIME, "fp32")]
                s = np.asarray(e["scores"])
                samples = s.size
                row.metric, row.drop = e["metric"], float(ref.mean() - s.mean())
                row.drop_ci = paired_bootstrap_ci(ref - s, bootstrap, confidence, seed)
                row.drop_noise = bool(row.drop_ci[0] <= 0.0 <= row.drop_ci[1])
                row.out_sqnr_db = float(e["out_sqnr_db"])
            e = st.get("exact", LEAVE_ONE_OUT, u, f)
            if e is not None:
                ref = refs[(LEAVE_ONE_OUT, f)]
                s = np.asarray(e["scores"])
                samples = s.size
                row.recovered = float(s.mean() - ref.mean())
                row.recovered_ci = paired_bootstrap_ci(s - ref, bootstrap, confidence, seed)
                row.recovered_noise = bool(row.recovered_ci[0] <= 0.0 <= row.recovered_ci[1])
            p = st.get("proxy", None, u, f)
            if p is not None:
                row.sqnr_db, row.mse, row.fisher = float(p["sqnr_db"]), p["mse"], p["fisher"]
            rows.append(row)
    for r in st.find("timing"):
        timing.setdefault(f"{r['mode']}_s", r["seconds"])
    notes = []
    if scanner.fallback_reason:
        notes.append(f"exact scans used full evaluations per layer (naive): {scanner.fallback_reason}.")
    return SensitivityTable(task=task, backend=backend, metric=metric, layers=[(u, kinds[u]) for u in order],
                            formats=formats, modes=modes, reference=reference, rows=rows, samples=samples,
                            bootstrap=bootstrap, confidence=confidence, spearman=correlations(rows, formats),
                            timing=timing, fingerprint=st.fingerprint, notes=notes)
