"""The package imports lazily: plain-data modules import where torch cannot, and ``mixq.quantize`` /
``mixq.inventory`` stay the functions whatever was imported first. Each case runs in a fresh interpreter."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# A finder ahead of every other one: any import of torch (or a torch submodule) fails.
BLOCK_TORCH = """
import sys
class _NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError(f"torch is not importable in this test ({name})")
        return None
sys.meta_path.insert(0, _NoTorch())
"""

PLAIN = ["mixq", "mixq.plan", "mixq.formats", "mixq.errors", "mixq.artifacts", "mixq.report", "mixq.latency",
         "mixq.latency.base", "mixq.latency.stats", "mixq.latency.model", "mixq.latency.trtexec",
         "mixq.sensitivity.table", "mixq.run_config", "mixq.pipeline_report", "mixq.report_html"]


def run_fresh(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)


@pytest.mark.parametrize("module", PLAIN)
def test_plain_data_module_imports_without_torch(module):
    res = run_fresh(BLOCK_TORCH + f"""
import importlib
m = importlib.import_module({module!r})
assert "torch" not in sys.modules
print(m.__name__)
""")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == module


def test_plain_modules_work_without_torch(tmp_path):
    """Not only the import: a plan round-trips, a latency predictor fits, a table loads, an artifact is written."""
    res = run_fresh(BLOCK_TORCH + f"""
import mixq
from mixq.plan import QuantPlan
from mixq.latency.model import AdditiveLatency, UnitGraph
from mixq.artifacts import write_atomic
p = QuantPlan(backend="ort-cpu", default="int8", layers={{"b": "fp32"}}, calib_method="entropy")
assert QuantPlan.from_json(p.to_json()) == p and mixq.QuantPlan is QuantPlan
p.save({str(tmp_path / 'plan.json')!r})
g = UnitGraph(units=("a", "b"), kinds={{"a": "linear", "b": "linear"}})
assert isinstance(mixq.get_format("int8").name, str)
write_atomic({str(tmp_path / 'x.txt')!r}, "ok")
assert "torch" not in sys.modules
""")
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "plan.json").is_file() and (tmp_path / "x.txt").read_text() == "ok"


def test_import_mixq_defers_torch_until_a_torch_name_is_used():
    res = run_fresh("""
import sys
import mixq
assert "torch" not in sys.modules, "import mixq imported torch"
mixq.QuantPlan, mixq.MixqError, mixq.FORMATS
assert "torch" not in sys.modules, "a plain name imported torch"
assert sorted(mixq.__all__) == sorted(n for n in dir(mixq) if n in mixq.__all__)
f = mixq.prepare
assert "torch" in sys.modules and callable(f)
""")
    assert res.returncode == 0, res.stderr


QUANTIZE = """
import torch
from torch import nn
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
calib = [torch.randn(4, 4) for _ in range(2)]
q = mixq.quantize(model, "int8", calib_data=calib)
assert q.mixq.backend == "ort-cpu"
layers = mixq.inventory(model, calib[0])
assert len(layers) == 2, layers
assert callable(mixq.quantize) and callable(mixq.inventory)
from mixq import quantize, inventory
assert quantize is mixq.quantize and inventory is mixq.inventory
print("ok")
"""


@pytest.mark.parametrize("first", [
    "import mixq.quantize as m\nimport mixq",
    "import mixq\nimport mixq.quantize as m",
    "import mixq.inventory\nimport mixq",
    "import mixq\nimport mixq.inventory\nimport mixq.quantize",
    "from mixq.quantize import set_plan\nimport mixq",
    "import mixq\nfrom mixq.inventory import inventory as inv\nfrom mixq.quantize import quantize as qz\n"
    "assert inv is mixq.inventory and qz is mixq.quantize",
    "import mixq\nmixq.quantize\nimport mixq.quantize",
])
def test_quantize_and_inventory_stay_functions_in_any_import_order(first):
    res = run_fresh(first + "\n" + QUANTIZE)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().endswith("ok")


def test_unknown_name_is_an_attribute_error():
    res = run_fresh("""
import mixq
try:
    mixq.not_a_name
except AttributeError as e:
    assert "not_a_name" in str(e)
else:
    raise SystemExit("no AttributeError")
""")
    assert res.returncode == 0, res.stderr
