"""Batch-1 FP32 latency of the EfficientNet-Lite0 example on ONNX Runtime CPU, per input size.

Chooses ``effnet_fashion.IMAGE_SIZE``: each candidate size is exported with ``torch.onnx``
(the whole ``FashionEffNet``, upsampling included, and the bare network for comparison),
then every session runs once per round, in rotation, so that a load change on a shared
machine hits all sizes alike; the median per size is printed. Weights do not change FP32
latency, so the pretrained network is timed (no fine-tuning needed).

Usage::

    PYTHONPATH=. python -m experiments.effnet_latency --sizes 96 128 160 --rounds 300
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from experiments.effnet_fashion import _pretrained


def _session(module: torch.nn.Module, example: torch.Tensor, path: Path, threads: int):  # -> ort.InferenceSession
    import onnxruntime as ort

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # legacy-exporter deprecation and constant-folding notes
        torch.onnx.export(module, (example,), str(path), input_names=["x"], output_names=["logits"], dynamo=False)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def measure(sizes: Sequence[int], rounds: int = 300, warmup: int = 30, threads: int = 1) -> dict[str, float]:
    """Return the median batch-1 latency in ms of each exported variant.

    Args:
        sizes: Input sizes (pixels) to compare.
        rounds: Timed runs per variant, interleaved.
        warmup: Untimed runs per variant first.
        threads: ONNX Runtime intra-op threads.

    Returns:
        ``{"fashion@S": ms, "bare@S": ms}`` for each size ``S``: the example model on a
        1x28x28 input, and EfficientNet-Lite0 alone on a 3xSxS input.
    """
    sessions = {}
    with tempfile.TemporaryDirectory() as tmp:
        for size in sizes:
            model = _pretrained(size).eval()
            sessions[f"fashion@{size}"] = (
                _session(model, torch.zeros(1, 1, 28, 28), Path(tmp, f"f{size}.onnx"), threads),
                np.zeros((1, 1, 28, 28), np.float32),
            )
            sessions[f"bare@{size}"] = (
                _session(model.net, torch.zeros(1, 3, size, size), Path(tmp, f"b{size}.onnx"), threads),
                np.zeros((1, 3, size, size), np.float32),
            )
        times: dict[str, list[float]] = {name: [] for name in sessions}
        for r in range(warmup + rounds):
            for name, (sess, x) in sessions.items():
                t0 = time.perf_counter()
                sess.run(None, {"x": x})
                if r >= warmup:
                    times[name].append(time.perf_counter() - t0)
    return {name: float(np.median(t)) * 1e3 for name, t in times.items()}


def main(argv: Sequence[str] | None = None) -> None:
    """Print the median latency per variant."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[96, 128, 160])
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    for name, ms in measure(args.sizes, args.rounds, threads=args.threads).items():
        print(f"{name:12s} {ms:6.2f} ms")


if __name__ == "__main__":
    main()
