"""Resumable scan results: one JSON line per finished measurement, tied to a fingerprint.

The file (``scan.jsonl`` in the run folder) starts with a header holding the fingerprint of
everything the results depend on (model weights and code, calibration data, evaluation data,
metric, settings), each part hashed separately so a mismatch can say *what* changed. Every finished
(layer, format) measurement is appended as one line, flushed and fsync'ed before the scan moves
on: a killed scan loses at most the measurement in flight, and a torn last line is dropped on
the next open. A lock file keeps two scans from writing the same folder at once.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import os
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional

from mixq.artifacts import write_atomic
from mixq.sensitivity.errors import ScanError, StaleScanError

STORE_VERSION = 1
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


# --------------------------------------------------------------------- fingerprint
def _update(h: "hashlib._Hash", obj: Any) -> None:
    import numpy as np
    import torch

    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        if t.dtype in (torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2):
            t = t.view(torch.uint8) if t.element_size() == 1 else t.view(torch.int16)
        h.update(memoryview(t.numpy()).cast("B"))
    elif isinstance(obj, np.ndarray):
        a = np.ascontiguousarray(obj)
        h.update(f"A{a.dtype}{a.shape}".encode())
        h.update(memoryview(a).cast("B") if a.dtype != object else repr(a.tolist()).encode())
    elif isinstance(obj, Mapping):
        h.update(b"{")
        for k in sorted(obj, key=str):
            h.update(repr(k).encode())
            _update(h, obj[k])
        h.update(b"}")
    elif isinstance(obj, (list, tuple)):
        h.update(b"[" if isinstance(obj, list) else b"(")
        for v in obj:
            _update(h, v)
        h.update(b"]")
    elif obj is None or isinstance(obj, (bool, int, float, str, bytes)):
        h.update(repr(obj).encode())
    else:
        h.update(_ADDRESS.sub("", repr(obj)).encode())


def digest(*objs: Any) -> str:
    """A short SHA-256 of tensors, arrays and plain containers (addresses in reprs are ignored)."""
    h = hashlib.sha256()
    for o in objs:
        _update(h, o)
    return h.hexdigest()[:16]


def _source(obj: Any) -> str:
    try:
        return inspect.getsource(obj)
    except (OSError, TypeError):
        return ""


def callable_name(fn: Callable) -> str:
    """``module:qualname`` of a function (what the report shows as the metric)."""
    mod = getattr(fn, "__module__", None) or "?"
    return f"{mod}:{getattr(fn, '__qualname__', type(fn).__name__)}"


def fingerprint(model: Any, calib_data: Any, eval_data: Any, metric_fn: Callable,
                settings: Mapping[str, Any]) -> dict[str, str]:
    """Hash each thing the results of a scan of a float model depend on; a change in any part makes them stale.

    The formats are deliberately not part of it: each format has its own calibrated quantizers,
    so adding a format to a finished scan measures only the new format.
    """
    return {
        "model": digest(type(model).__qualname__, _source(type(model)), model.state_dict()),
        "calib_data": digest(calib_data),
        "eval_data": digest(eval_data),
        "metric": digest(callable_name(metric_fn), _source(metric_fn)),
        "settings": digest(dict(settings)),
    }


def prepared_fingerprint(qmodel: Any, proxy_calib: Any, eval_data: Any, metric_fn: Callable,
                         settings: Mapping[str, Any]) -> dict[str, str]:
    """The fingerprint of a scan of an already calibrated mixq model (same parts as ``fingerprint``).

    ``model`` hashes the model's code and its weights (every parameter and buffer outside the
    quantizers); ``calib_data`` hashes what calibration produced (every quantizer's ranges and
    descriptor), the digest of the calibration batches the model recorded, if any, and the
    calibration batches handed to the scan for the proxies. So two models calibrated on different
    data differ in ``calib_data`` even when their weights are the same.
    """
    from torch import fx

    from mixq.quant.quantizer import TensorQuantizer

    prefixes = tuple(n + "." for n, m in qmodel.named_modules() if isinstance(m, TensorQuantizer))
    state = qmodel.state_dict()
    weights = {k: v for k, v in state.items() if not k.startswith(prefixes)}
    ranges = {k: v for k, v in state.items() if k.startswith(prefixes)}
    descs = {n: repr(m.desc) for n, m in qmodel.named_modules() if isinstance(m, TensorQuantizer)}
    st = qmodel.mixq
    code = qmodel.code if isinstance(qmodel, fx.GraphModule) else _source(type(qmodel))
    return {
        "model": digest(type(qmodel).__qualname__ if not isinstance(qmodel, fx.GraphModule) else "fx", code, weights),
        "calib_data": digest(getattr(st, "calib_digest", ""), ranges, descs, proxy_calib),
        "eval_data": digest(eval_data),
        "metric": digest(callable_name(metric_fn), _source(metric_fn)),
        "settings": digest(dict(settings)),
    }


_PART_WORDS = {"model": "the model (weights or code)", "calib_data": "the calibration data",
               "eval_data": "the evaluation data", "metric": "the metric",
               "settings": "the scan settings (backend, calibration method, quantization mode, proxy data, seed, "
                           "float or prepared model)"}


# --------------------------------------------------------------------- store
def record_key(rec: Mapping[str, Any]) -> tuple:
    return (rec["type"], rec.get("mode"), rec.get("layer"), rec.get("format"))


class ScanStore:
    """Finished measurements of one scan, in memory and (when ``path`` is given) on disk.

    Args:
        path: the JSONL file, or None for an in-memory store.
        parts: the fingerprint parts of the scan about to run.
        fresh: discard any results already in ``path``.

    Raises:
        StaleScanError: ``path`` holds results of a different fingerprint.
        ScanError: another scan holds the lock, or the file is corrupt.
    """

    def __init__(self, path: Optional[str | os.PathLike], parts: Mapping[str, str], fresh: bool = False,
                 meta: Optional[Mapping[str, Any]] = None) -> None:
        self.path = Path(path) if path is not None else None
        self.parts = dict(parts)
        self.records: dict[tuple, dict] = {}
        self._lock = None
        self.created = True  # False when existing results were read
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._acquire_lock()
        try:
            if fresh and self.path.exists():
                self.path.unlink()
            if self.path.exists() and self.path.stat().st_size > 0:
                self._read()
                self.created = False
            else:
                header = {"type": "header", "version": STORE_VERSION, "fingerprint": self.parts, **(meta or {})}
                write_atomic(self.path, json.dumps(header) + "\n")
        except BaseException:
            self.close()
            raise

    @property
    def fingerprint(self) -> str:
        return digest(self.parts)

    def _acquire_lock(self) -> None:
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock, the scan still works
            return
        lock_path = self.path.with_name(self.path.name + ".lock")
        fh = open(lock_path, "a")
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.close()
            raise ScanError(f"another scan is writing {str(self.path)!r}; wait for it to finish or use "
                            "another run folder.") from None
        self._lock = fh

    def _read(self) -> None:
        text = self.path.read_text()
        lines = text.split("\n")
        complete, torn = lines[:-1], lines[-1]  # text ends with "\n" unless the last write was torn
        parsed = []
        for i, line in enumerate(complete):
            try:
                parsed.append(json.loads(line))
            except json.JSONDecodeError:
                if i == len(complete) - 1:
                    torn = line
                    break
                raise ScanError(f"{str(self.path)!r} is corrupt at line {i + 1}; delete it (or pass --fresh) "
                                "to start the scan over.") from None
        if torn:
            # A line cut short by a kill: keep everything before it.
            write_atomic(self.path, "".join(json.dumps(r) + "\n" for r in parsed))
        if not parsed or parsed[0].get("type") != "header":
            raise ScanError(f"{str(self.path)!r} is not a mixq scan file (no header); delete it or pass --fresh.")
        old = parsed[0].get("fingerprint", {})
        changed = [k for k in self.parts if old.get(k) != self.parts[k]]
        if changed:
            what = ", ".join(_PART_WORDS.get(k, k) for k in changed)
            raise StaleScanError(
                f"{str(self.path)!r} holds results for a different scan: {what} changed since they were "
                f"measured, so they cannot be mixed with new ones. Pass --fresh (fresh=True) to discard "
                f"them, or use another run folder.")
        for rec in parsed[1:]:
            self.records[record_key(rec)] = rec

    def get(self, type_: str, mode: Optional[str] = None, layer: Optional[str] = None,
            fmt: Optional[str] = None) -> Optional[dict]:
        return self.records.get((type_, mode, layer, fmt))

    def find(self, type_: str) -> Iterable[dict]:
        return [r for k, r in self.records.items() if k[0] == type_]

    def add(self, rec: dict) -> None:
        """Record one finished measurement (on disk before this returns)."""
        self.records[record_key(rec)] = rec
        if self.path is None:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def close(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def __enter__(self) -> "ScanStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class PartialFiles:
    """Per-(mode, base, layer, format, batch) outputs of unfinished results, one file each.

    They live next to the results file (``scan.partial/``) and belong to its fingerprint; a
    finished result's files are deleted once its scores are in the results file. Each file is
    written to a temporary name and renamed, so a killed process never leaves half a file.

    The folder may come from someone else (a shared or copied run folder), so files are read
    with ``torch.load(weights_only=True)``: tensors and plain containers only, never code. Files
    left by an earlier run are checked when the folder is opened; one that does not load
    (truncated, corrupt, or not ours) is deleted with a one-line notice, and its piece is
    recomputed. An output that is not plain tensors and containers stays in memory instead.

    Args:
        folder: where the files go; None uses a temporary folder removed by ``close``.
    """

    def __init__(self, folder: Optional[str | os.PathLike]) -> None:
        import tempfile

        self._tmp = tempfile.TemporaryDirectory(prefix="mixq-scan-") if folder is None else None
        self.folder = Path(self._tmp.name if folder is None else folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._memory: dict[tuple, Any] = {}
        self.discarded: list[str] = []
        self._check_existing()

    def _check_existing(self) -> None:
        import sys

        for tmp in self.folder.glob("*.tmp"):  # a put killed before its rename
            tmp.unlink(missing_ok=True)
        errors = []
        for p in sorted(self.folder.glob("*.pt")):
            try:
                _load(p)
            except Exception as e:  # torch raises many types for a bad file (UnpicklingError, RuntimeError, EOFError ...)
                p.unlink(missing_ok=True)
                self.discarded.append(p.name)
                errors.append(f"{p.name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200])
        if errors:
            print(f"mixq scan: discarded {len(errors)} unreadable partial file(s) in {str(self.folder)!r}, to be "
                  f"recomputed (first: {errors[0]})", file=sys.stderr, flush=True)

    def _path(self, mode: str, base: str, unit: str, fmt: str, batch: int) -> Path:
        return self.folder / f"{mode}.{base}.{fmt}.{batch}.{unit}.pt"

    def has(self, mode: str, base: str, unit: str, fmt: str, batch: int) -> bool:
        if (mode, base, unit, fmt, batch) in self._memory:
            return True
        p = self._path(mode, base, unit, fmt, batch)
        return p.is_file() and p.stat().st_size > 0  # an empty file (power loss before a flush) is redone

    def put(self, mode: str, base: str, unit: str, fmt: str, batch: int, value: Any) -> None:
        import torch

        if not _plain(value):
            self._memory[(mode, base, unit, fmt, batch)] = value
            return
        p = self._path(mode, base, unit, fmt, batch)
        tmp = p.with_name(p.name + ".tmp")
        with open(tmp, "wb") as f:
            torch.save(value, f)
        os.replace(tmp, p)  # no fsync: a killed process loses nothing the rename made visible

    def get(self, mode: str, base: str, unit: str, fmt: str, batch: int) -> Any:
        """The stored output.

        Raises:
            ScanError: the file went missing or became unreadable while the scan ran.
        """
        key = (mode, base, unit, fmt, batch)
        if key in self._memory:
            return self._memory[key]
        p = self._path(*key)
        try:
            return _load(p)
        except Exception as e:  # see _check_existing
            raise ScanError(f"partial result {str(p)!r} became unreadable during the scan ({type(e).__name__}); "
                            "rerun the scan (it recomputes the piece), and keep other processes out of the "
                            "run folder.") from None

    def drop(self, mode: str, base: str, unit: str, fmt: str) -> None:
        for k in [k for k in self._memory if k[:4] == (mode, base, unit, fmt)]:
            del self._memory[k]
        for p in self.folder.glob(f"{mode}.{base}.{fmt}.*.{unit}.pt"):
            if p.name.split(".", 4)[4] == f"{unit}.pt":
                p.unlink(missing_ok=True)

    def clear(self) -> None:
        import shutil

        self._memory.clear()
        shutil.rmtree(self.folder, ignore_errors=True)

    def close(self) -> None:
        self._memory.clear()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


def _load(path: Path) -> Any:
    import warnings

    import torch

    with warnings.catch_warnings():  # a foreign file's pickle-protocol warning would only repeat the notice
        warnings.simplefilter("ignore")
        # weights_only: tensors and plain containers; a pickle that would run code is refused
        return torch.load(path, map_location="cpu", weights_only=True)


def _plain(value: Any) -> bool:
    """Whether ``torch.load(weights_only=True)`` gives ``value`` back (tensors, numbers, strings, containers)."""
    import torch

    if isinstance(value, torch.Tensor):
        return type(value) is torch.Tensor or isinstance(value, torch.nn.Parameter)
    if value is None or type(value) in (bool, int, float, complex, str, bytes):
        return True
    if type(value) in (list, tuple):
        return all(_plain(v) for v in value)
    if type(value) is dict:
        return all(type(k) in (str, int) and _plain(v) for k, v in value.items())
    return False
