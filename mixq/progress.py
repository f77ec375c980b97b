"""Progress bars for long loops (calibration, evaluation, verification): tqdm, shown only on a terminal."""
from __future__ import annotations

from typing import Any, Callable, Iterable, Optional


def batches(items: Iterable, desc: Optional[str]) -> Iterable:
    """``items`` with a progress bar labelled ``desc`` (no bar when ``desc`` is None or stderr is not a terminal)."""
    if desc is None:
        return items
    from tqdm.auto import tqdm

    total = len(items) if hasattr(items, "__len__") else None
    return tqdm(items, desc=desc, total=total, unit="batch", leave=False, disable=None, dynamic_ncols=True)


def on_batch(total: int, desc: Optional[str]) -> tuple[Optional[Callable[[int], None]], Callable[[], None]]:
    """A callback ``f(batch_index)`` that advances a bar, and a function that closes the bar."""
    if desc is None:
        return None, lambda: None
    from tqdm.auto import tqdm

    bar: Any = tqdm(total=total, desc=desc, unit="batch", leave=False, disable=None, dynamic_ncols=True)
    return (lambda i: bar.update(1)), bar.close
