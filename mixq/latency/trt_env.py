"""TensorRT and CUDA from Python: import TensorRT (or say what to install), check a GPU is usable, and
device memory / streams / event timing through torch (a CUDA build) or cuda-python (``_Cuda``).

``tensorrt`` and CUDA are imported lazily: importing this module works anywhere.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

from mixq.errors import MixqError
from mixq.latency.stats import LatencyError

INSTALL_HINT = ("install TensorRT's Python package on a machine with an NVIDIA GPU and driver "
                "(`pip install 'mixq[tensorrt]'`, i.e. tensorrt>=10), plus either a CUDA build of torch "
                "or cuda-python (`pip install cuda-python`) for device memory.")


class TensorRTUnavailableError(MixqError, RuntimeError):
    """TensorRT, CUDA or a GPU is missing; the message says what to install."""


class EngineBuildError(MixqError, RuntimeError):
    """TensorRT could not parse the ONNX or build an engine; the message carries its errors."""


# ----------------------------------------------------------------------------------- environment
def import_tensorrt() -> Any:
    """Import ``tensorrt`` or raise ``TensorRTUnavailableError`` with the install hint."""
    try:
        import tensorrt as trt
    except ImportError as e:
        raise TensorRTUnavailableError(f"TensorRT is not installed ({e}); {INSTALL_HINT}") from None
    return trt


def trt_version(trt: Any = None) -> tuple[int, int]:
    """(major, minor) of the installed TensorRT."""
    trt = trt or import_tensorrt()
    parts = str(getattr(trt, "__version__", "0.0")).split(".")
    return int(parts[0]), int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0


def available() -> tuple[bool, str]:
    """Whether engines can be built and run here, and if not, why (for skip messages)."""
    try:
        trt = import_tensorrt()
        if trt_version(trt)[0] < 10:
            return False, f"TensorRT {trt.__version__} is older than 10; mixq needs TensorRT >= 10."
        _Cuda()
    except TensorRTUnavailableError as e:
        return False, str(e)
    return True, ""


class _Cuda:
    """Device memory, streams and event timing through torch (CUDA build) or cuda-python."""

    def __init__(self) -> None:
        self.torch = None
        self.cudart = None
        try:
            import torch

            if torch.cuda.is_available():
                self.torch = torch
                self.stream = torch.cuda.Stream()
                return
        except ImportError:
            pass
        try:
            try:
                from cuda.bindings import runtime as cudart
            except ImportError:
                from cuda import cudart  # cuda-python < 12.6
        except ImportError:
            raise TensorRTUnavailableError(f"no CUDA device is usable from Python (torch has no CUDA and "
                                           f"cuda-python is not installed); {INSTALL_HINT}") from None
        err, count = cudart.cudaGetDeviceCount()
        if int(err) != 0 or count == 0:
            raise TensorRTUnavailableError(f"no CUDA device found (cudaGetDeviceCount: {err}, {count}); {INSTALL_HINT}")
        self.cudart = cudart
        self.stream = self._ok(cudart.cudaStreamCreate())

    def _ok(self, ret: Any) -> Any:
        err, *rest = ret if isinstance(ret, tuple) else (ret,)
        if int(err) != 0:
            raise LatencyError(f"CUDA call failed: {err}")
        return rest[0] if len(rest) == 1 else rest

    def device_name(self) -> str:
        """The GPU's name (what a TensorRT latency was measured on)."""
        if self.torch:
            return str(self.torch.cuda.get_device_name(self.torch.cuda.current_device()))
        err, device = self.cudart.cudaGetDevice()
        props = self._ok(self.cudart.cudaGetDeviceProperties(device if int(err) == 0 else 0))
        name = getattr(props, "name", b"")
        return (name.decode(errors="replace") if isinstance(name, bytes) else str(name)).rstrip("\x00") or "unknown GPU"

    @property
    def stream_handle(self) -> int:
        return self.stream.cuda_stream if self.torch else int(self.stream)

    def alloc(self, nbytes: int) -> Any:
        if self.torch:
            return self.torch.empty(max(1, nbytes), dtype=self.torch.uint8, device="cuda")
        return self._ok(self.cudart.cudaMalloc(max(1, nbytes)))

    def ptr(self, buf: Any) -> int:
        return buf.data_ptr() if self.torch else int(buf)

    def free(self, buf: Any) -> None:
        if not self.torch:
            self._ok(self.cudart.cudaFree(buf))

    def to_device(self, buf: Any, host: np.ndarray) -> None:
        host = np.ascontiguousarray(host)
        if self.torch:
            src = self.torch.from_numpy(host.view(np.uint8).reshape(-1))
            buf[: src.numel()].copy_(src)
        else:
            kind = self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
            self._ok(self.cudart.cudaMemcpy(buf, host.ctypes.data, host.nbytes, kind))

    def to_host(self, buf: Any, shape: tuple, dtype: np.dtype) -> np.ndarray:
        out = np.empty(shape, dtype)
        if self.torch:
            out.view(np.uint8).reshape(-1)[:] = buf[: out.nbytes].cpu().numpy()
        else:
            kind = self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
            self._ok(self.cudart.cudaMemcpy(out.ctypes.data, buf, out.nbytes, kind))
        return out

    def synchronize(self) -> None:
        if self.torch:
            self.stream.synchronize()
        else:
            self._ok(self.cudart.cudaStreamSynchronize(self.stream))

    def time_ms(self, fn: Callable[[], None]) -> float:
        """GPU time of ``fn`` (which enqueues on ``self.stream``) measured with CUDA events."""
        if self.torch:
            a, b = self.torch.cuda.Event(enable_timing=True), self.torch.cuda.Event(enable_timing=True)
            a.record(self.stream)
            fn()
            b.record(self.stream)
            b.synchronize()
            return float(a.elapsed_time(b))
        rt = self.cudart
        a, b = self._ok(rt.cudaEventCreate()), self._ok(rt.cudaEventCreate())
        try:
            self._ok(rt.cudaEventRecord(a, self.stream))
            fn()
            self._ok(rt.cudaEventRecord(b, self.stream))
            self._ok(rt.cudaEventSynchronize(b))
            return float(self._ok(rt.cudaEventElapsedTime(a, b)))
        finally:
            rt.cudaEventDestroy(a)
            rt.cudaEventDestroy(b)
