"""PNG plots people would rather look at than read (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def loss_curves(histories: dict[str, list[dict[str, float]]], keys: list[str],
                out_path: Path, title: str) -> Path:
    """One panel per key, one line per run (e.g. per curriculum phase)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.6), squeeze=False)
    offset = 0
    for name, history in histories.items():
        steps = [offset + entry["step"] for entry in history]
        for axis, key in zip(axes[0], keys, strict=True):
            values = [entry.get(key) for entry in history]
            if any(v is not None for v in values):
                axis.plot(steps, values, label=name)
        offset = steps[-1] if steps else offset
    for axis, key in zip(axes[0], keys, strict=True):
        axis.set_title(key)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, out_path)


def save_figure(figure: Any, out_path: Path, dpi: int = 110) -> Path:
    """Write ``figure`` as a PNG atomically (temp file + rename) and close it."""
    import matplotlib.pyplot as plt

    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.tmp.png")
    figure.savefig(tmp, dpi=dpi)
    plt.close(figure)
    tmp.replace(out_path)
    return out_path
