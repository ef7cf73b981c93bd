"""The job's progress bar (images/s and ETA), shared by both engines."""

from __future__ import annotations


def progress_bar(total: int, enabled: bool, desc: str):
    """A tqdm bar over `total` images; disabled (but still usable as a context) when `enabled` is False."""
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="img", desc=desc, disable=not enabled, dynamic_ncols=True, smoothing=0.1)
