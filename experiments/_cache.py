"""Where trained example weights live between runs.

Weights are cached outside the repository so that a checkout stays small and a
changed recipe never reuses stale weights: the file name carries a hash of the
code and hyperparameters that produced it.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

CACHE_ENV = "MIXQ_CACHE"


def cache_dir() -> Path:
    """Return the folder that holds cached weights, creating it if needed.

    Returns:
        ``$MIXQ_CACHE`` when set, otherwise ``~/.cache/mixq``.
    """
    root = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "mixq")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def recipe_hash(*parts: Any) -> str:
    """Return a short stable hash of everything that determines a training result.

    Args:
        *parts: JSON-serialisable values (hyperparameters, source text of the model and
            training code). Keys of dicts are sorted so the hash does not depend on order.

    Returns:
        The first 12 hex digits of the SHA-256 of the JSON encoding.
    """
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def save_atomic(state: dict[str, torch.Tensor], path: Path) -> None:
    """Write a state_dict so that readers never see a half-written file.

    Two processes training at once both write complete files; the last
    ``os.replace`` wins, which is harmless because both hold the same recipe.

    Args:
        state: The tensors to save.
        path: Final location of the file.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(state, fh)
        os.chmod(tmp, 0o644)  # mkstemp makes the file private; a cache is meant to be shared
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
