"""`mixq run`: inventory -> scan -> search -> qat -> export -> verify -> latency -> report, in one command.

Each stage is the subcommand a user would run by hand (``mixq scan``, ``mixq search``, ``mixq qat``, ...), called
with arguments derived from the run configuration and writing into its own folder of the run folder
(``RUN/scan/``, ``RUN/search/``, ...). ``RUN/pipeline.json`` records every finished stage: its fingerprint (the
stage's arguments, the task's fingerprint, the fingerprints of the stages it reads, mixq's version) and the SHA-256
of each file it wrote. A stage whose fingerprint and files are unchanged is skipped; a stage killed midway has no
record, so the same command runs it again (the scan, the search and QAT resume inside from their own files).

A failed check (a unit the plan quantizes that runs float on the engine; the engine not computing what the
simulation computes) does not stop the pipeline: the report is written, says so, and the command exits 1.
"""
from __future__ import annotations

import hashlib
import json
import platform
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from mixq.errors import MixqError
from mixq.run_config import RunConfig

STAGES = ("inventory", "scan", "search", "qat", "export", "verify", "latency", "report")
RECORD = "pipeline.json"


@dataclass(frozen=True)
class Stage:
    """One stage: what it reads (earlier stages) and how it runs."""

    name: str
    needs: tuple[str, ...]
    what: str


STAGE_INFO = {s.name: s for s in (
    Stage("inventory", (), "the quantizable units of the model"),
    Stage("scan", (), "one-at-a-time sensitivity of every unit"),
    Stage("search", ("scan",), "Optuna study against measured latency, with every baseline"),
    Stage("qat", ("search",), "quantization-aware training of the searched plan"),
    Stage("export", ("search", "qat"), "ONNX with Q/DQ where the plan says, and the file to ship"),
    Stage("verify", ("export",), "engine vs simulation on the test split"),
    Stage("latency", ("search", "export"), "FP32, all-INT8, searched and QAT re-timed in one fresh process"),
    Stage("report", STAGES[:-1], "one Markdown page and its HTML rendering"),
)}


class PipelineError(MixqError, RuntimeError):
    """A stage failed, or a partial run (--from) lacks what an earlier stage writes."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _files(paths: list[Path]) -> dict[str, str]:
    """{path: sha256} of every file under ``paths`` (folders walked)."""
    out = {}
    for p in paths:
        for f in sorted(p.rglob("*")) if p.is_dir() else [p]:
            if f.is_file() and not f.name.startswith(".") and ".tmp" not in f.name:
                out[str(f)] = _sha256(f)
    return out


class Pipeline:
    """The stages of one run folder, their arguments and their records."""

    def __init__(self, cfg: RunConfig, run_dir: Path, task_args: list[str], task, argv: list[str],
                 fresh: bool = False) -> None:
        self.cfg, self.d, self.task_args, self.task, self.argv = cfg, run_dir, task_args, task, argv
        self.fresh = fresh  # every stage runs again, and the scan, search and QAT discard what they had
        self.record_path = run_dir / RECORD
        self.records = self._read_records()
        self.task_fp: Optional[str] = None
        self.outcome: dict[str, dict] = {}
        self.running_fp = ""  # the fingerprint of the stage now running

    # ------------------------------------------------------------------ records
    def _read_records(self) -> dict:
        if not self.record_path.is_file():
            return {}
        try:
            return json.loads(self.record_path.read_text()).get("stages", {})
        except (json.JSONDecodeError, AttributeError):
            return {}  # a damaged record: every stage runs again (their own files resume them)

    def _write_records(self) -> None:
        from mixq.artifacts import write_atomic

        write_atomic(self.record_path, json.dumps({"config": self.cfg.to_dict(), "task_fingerprint": self.task_fp,
                                                   "command": self.command, "stages": self.records}, indent=1))

    @property
    def command(self) -> str:
        return "mixq " + shlex.join(self.argv)

    def fingerprint(self, stage: str, args: list[str]) -> str:
        from mixq import __version__

        up = {n: [self.records.get(n, {}).get("fingerprint"), self.records.get(n, {}).get("files")]
              for n in STAGE_INFO[stage].needs}  # what the earlier stages wrote, not only how they were asked
        parts = {"stage": stage, "args": [a for a in args if a not in ("--fresh", "--restart")], "task": self.task_fp,
                 "mixq": __version__, "upstream": up}
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()

    def current(self, stage: str, fp: str) -> bool:
        """The stage finished with this fingerprint and its files are as it wrote them."""
        rec = self.records.get(stage)
        if not rec or rec.get("fingerprint") != fp:
            return False
        return all(Path(p).is_file() and _sha256(Path(p)) == h for p, h in rec.get("files", {}).items())

    # ------------------------------------------------------------------ stage arguments
    def folder(self, stage: str) -> Path:
        return self.d / stage

    def search_best(self) -> Path:
        return self.folder("search") / "search-best.json"

    def qat_dir(self) -> Optional[Path]:
        rec = self.records.get("qat", {})
        return Path(rec["model"]) if rec.get("model") else None

    def args_of(self, stage: str) -> Optional[list[str]]:
        """The subcommand line of ``stage`` (latency, report: their settings; None: the stage does not apply)."""
        c, run = self.cfg, ["--run-dir", str(self.folder(stage))]
        top = c.section("")
        task = [*self.task_args, "--backend", top["backend"]]
        if stage == "inventory":
            return ["inventory", *task, *run]
        if stage == "scan":
            s = c.section("scan")
            split = ["--split", "search"] if self.task.search_fn is not None else []
            return ["scan", *task, *run, *split, "--mode", s["mode"], "--formats", s["formats"], "--bootstrap",
                    str(s["bootstrap"]), "--calib-method", s["calib_method"], "--seed", str(s["seed"]), "--no-progress",
                    *(["--method", s["method"], "--batch-axis", top["batch_axis"]] if s["method"] != "auto" else []),
                    *(["--fresh"] if self.fresh else [])]  # default method: the arguments (and records) of old runs
        if stage == "search":
            s = c.section("search")
            out = ["search", *task, *run, "--budget", top["budget"], "--trials", str(s["trials"]), "--sampler",
                   s["sampler"], "--seed", str(s["seed"]), "--formats", s["formats"], "--runs", str(s["runs"]),
                   "--rounds", str(s["rounds"]), "--candidates", str(s["candidates"]), "--workers", str(s["workers"]),
                   "--calib-method", c.get("scan", "calib_method"), "--batch-axis", top["batch_axis"], "--no-progress"]
            sens = self.folder("scan") / "sensitivity.json"
            if c.get("scan", "mode") == "one-at-a-time":
                out += ["--sensitivity", str(sens)]
            out += [] if s["random_baseline"] else ["--no-random-baseline"]  # the random study doubles the search
            out += [] if s["evaluate"] == "simulation" else ["--evaluate", s["evaluate"]]  # old runs stay current
            return out + (["--storage", s["storage"]] if s["storage"] else []) + (["--fresh"] if self.fresh else [])
        if stage == "qat":
            q = c.section("qat")
            if not q["enabled"] or (self.task.train_fn is None and not top["train"]):
                return None
            out = ["qat", *task, *run, "--plan", str(self.search_best()), "--seed", str(q["seed"]),
                   *(["--restart"] if self.fresh else [])]
            out += ["--train", top["train"]] if top["train"] else []
            for k in ("epochs", "lr", "train_batches"):
                if q[k] is not None:
                    out += [f"--{k.replace('_', '-')}", str(q[k])]
            return out
        model = ["--qat", str(self.qat_dir())] if self.qat_dir() else ["--plan", str(self.search_best())]
        if stage == "export":
            return ["export", *task, *run, *model, "--batch-axis", top["batch_axis"]]
        if stage == "verify":
            v = c.section("verify")
            return ["verify", *task, *run, *model, "--onnx", self.records["export"]["onnx"], "--threads",
                    str(v["threads"]), "--batch-axis", top["batch_axis"], *([] if v["noise_floor"] else
                                                                             ["--no-noise-floor"])]
        if stage == "latency":
            return ["latency", json.dumps(c.section("latency"), sort_keys=True)]
        return ["report"]

    # ------------------------------------------------------------------ running
    def run(self, first: str, last: str) -> int:
        """Run the stages from ``first`` to ``last``; return the exit status (0, 1: a check failed)."""
        order = list(STAGES)
        start, stop = order.index(first), order.index(last)
        for earlier in order[:start]:
            if earlier not in self.records:
                raise PipelineError(f"--from {first}: the stage {earlier!r} has not finished in {self.d} (no record "
                                    f"in {self.record_path}); run without --from, or --from {earlier}.")
        self.task_fp = task_fingerprint(self.task, self.task_args)
        for i, stage in enumerate(order[start:stop + 1], start + 1):
            t0 = time.perf_counter()
            status = self._run_stage(stage, i, force=self.fresh or stage == first and first != "inventory")
            self.outcome[stage] = {"status": status, "seconds": time.perf_counter() - t0}
        # a check that failed in an earlier command and is still current fails this one too
        failed = [s for s in order[:stop + 1] if self.records.get(s, {}).get("passed") is False]
        ran = [s for s, o in self.outcome.items() if o["status"] in ("ran", "check failed")]
        print(f"mixq run: {'stopped after ' + last if last != 'report' else 'done'}; this command ran "
              f"{', '.join(ran) or 'no stage (all current)'} in {sum(o['seconds'] for o in self.outcome.values()):.0f} s"
              f" (all stages: {sum(r.get('seconds', 0) for r in self.records.values()):.0f} s); run folder {self.d}",
              flush=True)
        if "report" in self.records and stop == len(order) - 1:
            print(f"report: {self.records['report']['markdown']}\n        {self.records['report']['html']}")
        if failed:
            print(f"mixq run: FAILED: check(s) failed in {', '.join(failed)}; see the report.", file=sys.stderr)
            return 1
        return 0

    def _run_stage(self, stage: str, i: int, force: bool) -> str:
        head = f"[{i}/{len(STAGES)}] {stage}"
        args = self.args_of(stage)
        if args is None:
            why = "disabled in the configuration ([qat] enabled = false)" if not self.cfg.get("qat", "enabled") \
                else f"the task {self.task.name!r} has no training data (give train = 'module:function')"
            print(f"{head}: skipped: {why}", flush=True)
            self.records[stage] = {"fingerprint": self.fingerprint(stage, ["skipped"]), "files": {}, "skipped": why}
            self._write_records()
            return "skipped"
        fp = self.fingerprint(stage, args)
        if not force and self.current(stage, fp):
            print(f"{head}: current ({STAGE_INFO[stage].what}); skipped", flush=True)
            return "current" if self.records[stage].get("passed", True) else "check failed"
        print(f"{head}: {STAGE_INFO[stage].what} ...\n    mixq {shlex.join(args)}" if stage not in
              ("latency", "report") else f"{head}: {STAGE_INFO[stage].what} ...", flush=True)
        self.records.pop(stage, None)
        t0 = time.perf_counter()
        self.running_fp = fp
        rec = RUNNERS[stage](self, args)
        rec.update(fingerprint=fp, seconds=time.perf_counter() - t0, finished=time.strftime("%Y-%m-%d %H:%M:%S"))
        self.records[stage] = rec
        self._write_records()
        return "ran" if rec.get("passed", True) else "check failed"

    def call(self, args: list[str]) -> int:
        """Run one subcommand in a fresh process (nothing a stage leaves, threads or sessions, slows the next one);
        a bad-input error (exit 2) or a crash stops the pipeline."""
        import subprocess

        rc = subprocess.run([sys.executable, "-m", "mixq.cli", *args]).returncode
        if rc not in (0, 1):
            raise PipelineError(f"the stage `mixq {args[0]}` stopped (exit {rc}) with the error above; fix it and run "
                                f"the same command again (finished stages are skipped).")
        return rc


# ---------------------------------------------------------------------- one runner per stage: -> record
def _run_inventory(p: Pipeline, args: list[str]) -> dict:
    p.call(args)
    return {"files": _files([p.folder("inventory") / "inventory.json"])}


def _run_scan(p: Pipeline, args: list[str]) -> dict:
    p.call(args)
    d = p.folder("scan")
    return {"files": _files([d / "sensitivity.json", d / "report"])}


def _run_search(p: Pipeline, args: list[str]) -> dict:
    p.call(args)
    d = p.folder("search")
    if not p.search_best().is_file():
        raise PipelineError(f"the search found no plan that meets the budget {p.cfg.get('', 'budget')} when re-timed "
                            f"(see {d / 'search.md'}); give a looser budget (--budget) or more trials.")
    files = [d / n for n in ("search.json", "search.md", "search-best.json", "search-pareto.png",
                             "search-precision.png", "search-history.png")]
    return {"files": _files([f for f in files if f.is_file()])}


def _run_qat(p: Pipeline, args: list[str]) -> dict:
    """QAT resumes from its checkpoint only when the run it belongs to was this very stage (killed midway);
    a checkpoint of a finished or differently configured run is started over."""
    from mixq.artifacts import write_atomic

    d = p.folder("qat")
    d.mkdir(parents=True, exist_ok=True)
    marker = d / ".inflight"
    resume = marker.is_file() and marker.read_text() == p.running_fp
    write_atomic(marker, p.running_fp)
    p.call(args if resume or "--restart" in args else [*args, "--restart"])
    marker.unlink()
    label = p.search_best().stem
    return {"files": _files([d / f"qat-{label}.json", d / f"qat-{label}"]), "model": str(d / f"qat-{label}"),
            "summary": str(d / f"qat-{label}.json")}


def _run_export(p: Pipeline, args: list[str]) -> dict:
    rc = p.call(args)
    info = json.loads((p.folder("export") / "export.json").read_text())
    files = [Path(info["onnx"])] + ([Path(info["ship"])] if info.get("ship") else [])
    return {"files": _files(files + [p.folder("export") / "export.json"]), "onnx": info["onnx"], "passed": rc == 0}


def _run_verify(p: Pipeline, args: list[str]) -> dict:
    rc = p.call(args)
    found = sorted(p.folder("verify").glob("verify-*.json"), key=lambda f: f.stat().st_mtime)
    return {"files": _files(found[-1:]), "summary": str(found[-1]), "passed": rc == 0}


def _run_latency(p: Pipeline, args: list[str]) -> dict:
    """FP32, the search's baselines and plan, and the QAT model's file, re-timed in one fresh process."""
    from mixq.artifacts import write_atomic
    from mixq.search_final import SUBDIR
    from mixq.search_retime import retime_in_fresh_process

    search = json.loads((p.folder("search") / "search.json").read_text())
    job = json.loads((p.folder("search") / SUBDIR / "retime-job.json").read_text())
    lat = p.cfg.section("latency")
    plans = {r["plan"]: r["onnx"] for r in search["rows"] if r["plan"] != "fp32" and r.get("onnx")}
    plans["deployed"] = p.records["export"]["onnx"]
    job.update(plans=plans, rounds=lat["rounds"], runs=lat["runs"], min_seconds=lat["min_seconds"])
    d = p.folder("latency")
    d.mkdir(parents=True, exist_ok=True)
    res = retime_in_fresh_process(job, d)
    out = write_atomic(d / "latency.json", json.dumps({"job": job, **res}, indent=1))
    print(f"    FP32 {res['fp32_ms']:.3f} ms; " + "; ".join(f"{n} {t['median_ms']:.3f} ms ({t['ratio']:.2f}x)"
                                                        for n, t in res["plans"].items()), flush=True)
    return {"files": _files([out]), "summary": str(out)}


def _run_report(p: Pipeline, args: list[str]) -> dict:
    from mixq.pipeline_report import write_report

    md, html = write_report(p.d, p.records, p.cfg.to_dict(), p.command, versions())
    return {"files": _files([md, html]), "markdown": str(md), "html": str(html)}


RUNNERS: dict[str, Callable[[Pipeline, list[str]], dict]] = {
    "inventory": _run_inventory, "scan": _run_scan, "search": _run_search, "qat": _run_qat, "export": _run_export,
    "verify": _run_verify, "latency": _run_latency, "report": _run_report}


# ---------------------------------------------------------------------- helpers
def task_fingerprint(task, task_args: list[str]) -> str:
    """SHA-256 of what every stage depends on: the task's name and specs, its model's weights and calibration data."""
    from mixq.fingerprint import Hasher, weights_digest

    h = Hasher()
    h.update(("task", task.name, task_args))
    h.update(weights_digest(task.model_fn()))
    for b in task.calib_fn():
        h.update(b)
    return h.hexdigest()


def versions() -> dict[str, str]:
    """Versions of what the figures depend on (read from package metadata: nothing imported)."""
    from importlib import metadata

    out = {"python": platform.python_version(), "platform": platform.platform()}
    for pkg in ("mixq", "torch", "onnxruntime", "onnx", "optuna", "numpy", "scipy"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "-"
    try:
        cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), None)
    except OSError:
        cpu = None
    out["cpu"] = cpu or platform.processor() or "-"
    return out
