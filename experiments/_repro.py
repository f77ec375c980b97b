"""Deterministic training and weight checksums for the example models.

Figures should reproduce, so training an example must give the same weights every time.
Seeds, one thread and ``torch.use_deterministic_algorithms`` make a run repeatable on
one machine, but not across machines: the kernels PyTorch picks depend on the CPU
(AVX-512 and AVX2 builds of the same op round differently; measured here, the MNIST
ResNet's weights differed between ``ATEN_CPU_CAPABILITY=avx512`` and ``avx2``). So
training runs in a child process (``train_in_child``) whose environment pins what can
only be pinned before torch starts:

- ``ATEN_CPU_CAPABILITY=avx2``: ATen's vectorised kernels use their AVX2 build on every
  x86-64 CPU that has AVX2 (every Intel and AMD CPU since about 2015);
- ``MKL_CBWR=AVX2``: MKL's conditional numerical reproducibility (same results on any
  CPU with AVX2, for a fixed thread count; checked: the MNIST weights are bit-identical
  with ``MKL_ENABLE_INSTRUCTIONS=AVX2`` and without);
- ``ONEDNN_MAX_CPU_ISA=AVX2``: oneDNN's AVX2 kernels;
- one OpenMP/MKL thread;

and ``deterministic`` disables oneDNN (mkldnn) by default, so convolutions go through
MKL GEMM, which is covered by MKL's reproducibility guarantee. oneDNN's kernels are not
documented to be reproducible across CPUs (their blocking follows the cache sizes), but
without it EfficientNet's depthwise convolutions run 3x slower, so that example keeps
it on (pinned to AVX2) and says so.

What this buys, measured: the same recipe twice on one machine gives the same bytes (a
test retrains the MNIST ResNet and compares). Across machines it does not hold: three
x86-64/AVX2 machines of this workplace, all pinned as above, trained the MNIST ResNet to
three different weight hashes (same accuracy within a few digits). So tests pin
repeatability and an accuracy band, not a hash, and a scan or search fingerprint made
on one machine is refused on another (its weights differ).
``state_sha256`` fingerprints the result so a test can pin it.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import os
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

# What the child's environment pins; it is part of every recipe hash.
PINNED_ENV = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "MKL_CBWR": "AVX2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}


@contextlib.contextmanager
def deterministic(seed: int, threads: int = 1, onednn: bool = False) -> Iterator[None]:
    """Run the body seeded, on ``threads`` threads, deterministic algorithms only, without oneDNN by default.

    The global torch RNG, the thread count, the deterministic-algorithms flags and the
    oneDNN switch are restored on exit, so a caller (a test suite, the CLI) is not
    affected by training.

    Args:
        seed: Seed for the global torch RNG (weight init, dropout); data order should use
            its own ``torch.Generator`` seeded from the same value.
        threads: Intra-op threads during the body. One thread fixes the reduction order
            of every parallel kernel, so the float rounding does not depend on the core count.
        onednn: Let convolutions use oneDNN (faster; see the module docstring for the cost).

    Yields:
        Nothing; the settings hold inside the ``with`` block.
    """
    prev_threads = torch.get_num_threads()
    prev_det = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    with contextlib.ExitStack() as stack:
        stack.enter_context(warnings.catch_warnings())
        # Switching oneDNN off or on warns about TF32 on Intel GPUs, which is irrelevant here.
        warnings.filterwarnings("ignore", message="TF32 acceleration")
        stack.enter_context(torch.random.fork_rng(devices=[]))
        stack.enter_context(torch.backends.mkldnn.flags(enabled=onednn))
        torch.manual_seed(seed)
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(True)
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(prev_det, warn_only=prev_warn)
            torch.set_num_threads(prev_threads)


def train_in_child(module: str, path: Path, timeout_s: float = 3600.0) -> float:
    """Train an example in a fresh interpreter with ``PINNED_ENV`` and wait for its weights.

    The child runs ``python -m <module> --train <path>``; the module's ``__main__`` trains
    under ``deterministic`` and saves the state_dict atomically to ``path``. Its output
    (progress lines) is passed on to this process's stderr as it comes.

    Args:
        module: Dotted name of the example module (``experiments.mnist_resnet``).
        path: Where the child writes the weights.
        timeout_s: Give up (and stop the child) after this many seconds.

    Returns:
        The wall-clock seconds the child took.

    Raises:
        RuntimeError: If the child fails, times out, or exits without writing ``path``;
            the message carries the end of its output.
    """
    root = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ, **PINNED_ENV)
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    env["PYTHONUNBUFFERED"] = "1"
    t0 = time.perf_counter()
    tail: collections.deque[str] = collections.deque(maxlen=40)
    with subprocess.Popen(
        [sys.executable, "-m", module, "--train", str(path)],
        env=env, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    ) as proc:
        timer = threading.Timer(timeout_s, proc.kill)
        timer.start()
        try:
            for line in proc.stdout or ():
                tail.append(line)
                print(f"  [{module.rsplit('.', 1)[-1]}] {line}", end="", file=sys.stderr, flush=True)
            returncode = proc.wait()
        finally:
            timer.cancel()
    seconds = time.perf_counter() - t0
    if seconds >= timeout_s:
        raise RuntimeError(f"training {module} took over {timeout_s:.0f} s; stopped it")
    if returncode != 0 or not path.exists():
        raise RuntimeError(f"training {module} failed (exit {returncode}); its output ends:\n{''.join(tail)}")
    return seconds


def state_sha256(state: Mapping[str, torch.Tensor]) -> str:
    """Return the SHA-256 of a state_dict in a canonical form.

    Entries are taken in sorted key order; each contributes its name, dtype, shape and the
    raw bytes of its contiguous CPU copy, so any changed value, shape, dtype or name changes it.

    Args:
        state: A ``state_dict`` (name -> tensor).

    Returns:
        The hex digest (64 characters).
    """
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
