"""Names of the activation calibration methods (plain data: imports no torch)."""
from __future__ import annotations

from mixq.errors import ConfigError, did_you_mean

CALIB_METHODS = ("max", "entropy", "percentile", "mse")


def check_calib_method(method: str) -> str:
    """Return the canonical name of an activation calibration method ("histogram" means "entropy").

    Raises:
        ConfigError: ``method`` is not one of ``CALIB_METHODS``.
    """
    if method == "histogram":
        return "entropy"
    if method not in CALIB_METHODS:
        raise ConfigError(f"unknown calib_method {method!r}; valid methods are {', '.join(CALIB_METHODS)}."
                          f"{did_you_mean(str(method), CALIB_METHODS)}")
    return method
