"""The built-in examples by name (plain data: the CLI lists them without importing torch)."""
from __future__ import annotations

EXAMPLES = {"mnist_resnet": "experiments.mnist_resnet", "minilm": "experiments.minilm",
            "effnet_fashion": "experiments.effnet_fashion", "minilm_bible": "experiments.minilm_bible",
            "minilm_hf": "experiments.minilm_hf"}
DEFAULT_EXAMPLE = "mnist_resnet"
