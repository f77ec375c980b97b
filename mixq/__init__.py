"""mixq: per-layer mixed-precision quantization, searched against measured engine latency."""
from __future__ import annotations

from mixq.errors import MixqError
from mixq.formats import BACKENDS, FORMATS, get_backend, get_format
from mixq.inventory import LayerInfo, inventory
from mixq.plan import QuantPlan
from mixq.quantize import add_formats, calibrate, prepare, quantize, set_plan

__all__ = ["MixqError", "BACKENDS", "FORMATS", "get_backend", "get_format", "LayerInfo", "inventory",
           "QuantPlan", "add_formats", "calibrate", "prepare", "quantize", "set_plan"]
__version__ = "0.1.0"
