"""Latency budgets: absolute (``6.5ms``) or relative to FP32 measured in the same session (``0.6x``)."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

from mixq.errors import ConfigError

_BUDGET = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(ms|x|%)\s*$")


@dataclass(frozen=True)
class Budget:
    """A latency budget.

    Attributes:
        value: milliseconds (``unit == "ms"``) or a fraction of the FP32 latency (``unit == "x"``).
        unit: "ms" or "x".
    """

    value: float
    unit: str

    def __post_init__(self) -> None:
        if self.unit not in ("ms", "x"):
            raise ConfigError(f"budget unit must be 'ms' or 'x', but got {self.unit!r}.")
        if not (math.isfinite(self.value) and self.value > 0):
            raise ConfigError(f"a budget must be a positive number, but got {self.value!r}; write milliseconds "
                              "like '6.5ms' or a fraction of FP32 latency like '0.6x'.")

    @classmethod
    def parse(cls, text: str) -> "Budget":
        """``"6.5ms"`` (absolute), ``"0.6x"`` or ``"60%"`` (of FP32 latency).

        Raises:
            ConfigError: anything else, with the forms that are valid.
        """
        m = _BUDGET.match(str(text))
        if not m:
            raise ConfigError(f"budget {text!r} is not understood; write milliseconds like '6.5ms' or a fraction "
                              "of FP32 latency like '0.6x' (or '60%').")
        value, unit = float(m.group(1)), m.group(2)
        if unit == "%":
            value, unit = value / 100.0, "x"
        return cls(value, unit)

    def limit_ms(self, fp32_ms: float) -> float:
        """The budget in milliseconds, given the FP32 latency measured in this session."""
        return self.value if self.unit == "ms" else self.value * fp32_ms

    def margin(self, ms: float, ratio: float, fp32_ms: float) -> tuple[bool, float, float]:
        """Judge one re-timed plan: ``x`` budgets on its median ratio to the FP32 run timed next to it, ``ms``
        budgets on its median milliseconds.

        Returns:
            (meets the budget, margin in ms, margin as a fraction of the budget); positive margins are inside.
        """
        if self.unit == "x":
            margin = self.value - ratio
            return margin >= 0, margin * fp32_ms, margin / self.value
        margin = self.value - ms
        return margin >= 0, margin, margin / self.value

    def __str__(self) -> str:
        return f"{self.value:g}ms" if self.unit == "ms" else f"{self.value:g}x FP32"
