"""The Hugging Face all-MiniLM-L6-v2 (``transformers.AutoModel``, captured with torch.export) vs the project's rewrite.

    python bench/hf_vs_rewrite.py [--layers a,b,...] [--out reports/hf_vs_rewrite]

On the ``minilm`` example's data (256 queries, calibration 8 x 32 texts, ort-cpu, max): per model, how it
was prepared (mode, capture, units by kind), FP32, all-INT8 simulated and all-INT8 on ONNX Runtime (the
engine's metric and its agreement with the simulation, integer kernels), and a one-at-a-time INT8 scan of
a few layers (``mixq.sensitivity.scan`` on the calibrated model, no proxies). Unit names of the HF model are
shown without the wrapper's ``bert.`` prefix. Prints a table; writes JSON and Markdown.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mixq  # noqa: E402
from mixq.artifacts import write_atomic  # noqa: E402
from mixq.evaluate import evaluate, evaluate_plan  # noqa: E402
from mixq.sensitivity import scan  # noqa: E402
from mixq.verify import verify  # noqa: E402

from experiments import minilm, minilm_hf  # noqa: E402

LAYERS = ("encoder.layer.0.attention.self.query", "encoder.layer.0.attention.self.matmul",
          "encoder.layer.0.output.dense", "encoder.layer.1.output.add", "encoder.layer.2.intermediate.dense",
          "encoder.layer.2.output.add")


def measure(name: str, model: torch.nn.Module, prefix: str, calib: list, evald: list, layers: list[str]) -> dict:
    """Everything the report shows for one model; unit names are given without ``prefix``."""
    t0 = time.perf_counter()
    fp32 = evaluate(model, evald, minilm.metric, keep_outputs=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # embeddings (and the HF pooler) stay float: LeftFloatWarning
        q = mixq.quantize(model, "int8", calib_data=calib)
    st = q.mixq
    int8 = evaluate_plan(q, st.plan, evald, minilm.metric, reference=fp32, keep_outputs=True)
    res = verify(q, "int8", evald, minilm.metric)
    table = scan(q, calib, evald, minilm.metric, layers=[prefix + l for l in layers], formats=["int8"],
                 modes="one-at-a-time", proxies=False, progress=False, task_name=name)
    kinds = list(st.kinds.values())
    return dict(
        model=name, mode=st.mode, capture=st.prepare_options.get("capture"), units=len(kinds),
        kinds={k: kinds.count(k) for k in sorted(set(kinds))},
        unit_names=sorted(u[len(prefix):] if u.startswith(prefix) else u for u in st.kinds),
        fp32=fp32.metric, int8_sim=int8.metric, int8_drop=int8.drop, int8_drop_ci=list(int8.drop_ci),
        engine=res.engine.metric, engine_vs_sim=res.engine.metric_diff, engine_agreement=res.engine.agreement,
        engine_cosine_mean=res.engine.cosine_mean, engine_integer_units=res.kernels["num_integer"],
        scan={r.layer[len(prefix):]: dict(metric=r.metric, drop=r.drop, drop_ci=list(r.drop_ci or ()),
                                          out_sqnr_db=r.out_sqnr_db) for r in table.rows},
        scan_reference=table.reference, fp32_scores=fp32.scores.tolist(), int8_scores=int8.scores.tolist(),
        fp32_outputs=[o.numpy() for o in fp32.outputs], int8_outputs=[o.numpy() for o in int8.outputs],
        seconds=time.perf_counter() - t0)


def _cos(a: list, b: list) -> tuple[float, float]:
    x, y = np.concatenate(a), np.concatenate(b)
    c = (x * y).sum(1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1))
    return float(c.mean()), float(c.min())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--layers", default=",".join(LAYERS), help="rewrite unit names to scan one at a time")
    ap.add_argument("--out", default="reports/hf_vs_rewrite")
    args = ap.parse_args()
    torch.set_num_threads(1)
    layers = args.layers.split(",")
    calib, evald = minilm.calib_data(), minilm.eval_data()
    rows = [measure("rewrite", minilm.model(), "", calib, evald, layers),
            measure("hf", minilm_hf.model(), minilm_hf.PREFIX, calib, evald, layers)]
    rw, hf = rows
    same = dict(
        unit_names=rw["unit_names"] == hf["unit_names"], kinds=rw["kinds"] == hf["kinds"],
        fp32_cosine=_cos(rw["fp32_outputs"], hf["fp32_outputs"]),
        fp32_max_abs_diff=float(max(np.abs(a - b).max() for a, b in zip(rw["fp32_outputs"], hf["fp32_outputs"]))),
        fp32_same_hits=float(np.mean(np.equal(rw["fp32_scores"], hf["fp32_scores"]))),
        int8_cosine=_cos(rw["int8_outputs"], hf["int8_outputs"]),
        int8_same_hits=float(np.mean(np.equal(rw["int8_scores"], hf["int8_scores"]))))
    for r in rows:
        for k in ("fp32_outputs", "int8_outputs", "fp32_scores", "int8_scores"):
            r.pop(k)
    head = f"{'':34s} {'rewrite':>22s} {'hf (AutoModel)':>22s}"
    lines = [head,
             f"{'mode / capture':34s} {rw['mode'] + ' / ' + str(rw['capture']):>22s} "
             f"{hf['mode'] + ' / ' + str(hf['capture']):>22s}",
             f"{'units (linear, matmul, add)':34s} {str(rw['kinds']):>22s} {str(hf['kinds']):>22s}"]
    for key, label in (("fp32", "FP32 R@1"), ("int8_sim", "all-INT8 simulated"), ("engine", "all-INT8 ORT engine"),
                       ("engine_agreement", "engine/sim per-query agreement"), ("engine_integer_units",
                                                                                  "units in integer kernels")):
        lines.append(f"{label:34s} {rw[key]:>22.4g} {hf[key]:>22.4g}")
    for l in layers:
        a, b = rw["scan"][l], hf["scan"][l]
        lines.append(f"scan {l:29s} {a['drop']:+10.2f} ({a['out_sqnr_db']:5.1f} dB) {b['drop']:+10.2f} "
                     f"({b['out_sqnr_db']:5.1f} dB)")
    print("\n".join(lines))
    print(json.dumps(same))
    out = Path(args.out)
    write_atomic(out.with_suffix(".json"), json.dumps({"command": " ".join(["python"] + sys.argv), "rows": rows,
                                                      "same": same}, indent=1))
    md = [f"Command: `python {' '.join(sys.argv)}` (ort-cpu, max calibration on 8 x 32 texts, 256 queries; "
          "1 intra-op thread)", "",
          "| | rewrite (`experiments.minilm`) | Hugging Face `AutoModel` (`experiments.minilm_hf`) |", "|---|---|---|",
          f"| graph mode / capture | {rw['mode']} / {rw['capture']} | {hf['mode']} / {hf['capture']} |",
          f"| units | {rw['units']} {rw['kinds']} | {hf['units']} {hf['kinds']} |",
          f"| FP32 R@1 | {rw['fp32']:.2f} | {hf['fp32']:.2f} |",
          f"| all-INT8 simulated | {rw['int8_sim']:.2f} (drop {rw['int8_drop']:+.2f} [{rw['int8_drop_ci'][0]:+.2f}, "
          f"{rw['int8_drop_ci'][1]:+.2f}]) | {hf['int8_sim']:.2f} (drop {hf['int8_drop']:+.2f} "
          f"[{hf['int8_drop_ci'][0]:+.2f}, {hf['int8_drop_ci'][1]:+.2f}]) |",
          f"| all-INT8 ONNX Runtime | {rw['engine']:.2f} ({rw['engine_vs_sim']:+.2f} vs sim, agreement "
          f"{100 * rw['engine_agreement']:.1f}%) | {hf['engine']:.2f} ({hf['engine_vs_sim']:+.2f} vs sim, agreement "
          f"{100 * hf['engine_agreement']:.1f}%) |",
          f"| units in integer kernels | {rw['engine_integer_units']} | {hf['engine_integer_units']} |", "",
          "One-at-a-time INT8 scan (drop in points [95% interval], output SQNR):", "",
          "| layer | rewrite | HF |", "|---|---|---|"]
    for l in layers:
        a, b = rw["scan"][l], hf["scan"][l]
        md.append(f"| {l} | {a['drop']:+.2f} [{a['drop_ci'][0]:+.2f}, {a['drop_ci'][1]:+.2f}], {a['out_sqnr_db']:.1f} dB"
                  f" | {b['drop']:+.2f} [{b['drop_ci'][0]:+.2f}, {b['drop_ci'][1]:+.2f}], {b['out_sqnr_db']:.1f} dB |")
    md += ["", f"Same unit names (HF without `bert.`): {same['unit_names']}; same kinds: {same['kinds']}. "
           f"FP32 outputs: cosine mean {same['fp32_cosine'][0]:.7f} (min {same['fp32_cosine'][1]:.7f}), max abs "
           f"difference {same['fp32_max_abs_diff']:.2g}, same hit on {100 * same['fp32_same_hits']:.1f}% of queries. "
           f"All-INT8 simulated outputs: cosine mean {same['int8_cosine'][0]:.4f} (min {same['int8_cosine'][1]:.4f}), "
           f"same hit on {100 * same['int8_same_hits']:.1f}% of queries.", "",
           "The two models hold the same calibrated quantizers (to 1e-4; tests/test_hf_capture.py). Their all-INT8 "
           "simulations still part where a float32 rounding difference of ~1e-7 flips one integer code (the layer-0 "
           "score matmul, same inputs, one output step) and all-INT8 MiniLM amplifies it: the rewrite's own float64 "
           "and float32 simulations disagree as much (README, issue 4). One INT8 unit at a time, the flips are too "
           "rare to show: the scan gives the same drops and output SQNRs."]
    write_atomic(out.with_suffix(".md"), "\n".join(md) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
