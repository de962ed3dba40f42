"""Per-round metric curves as PNG files (matplotlib, Agg backend)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from zk0_pipelines.tracking.round_metrics import is_number


def plot_round_metrics(
    round_metrics: Sequence[Mapping[str, Any]],
    out_png: Path,
    keys: Sequence[str] | None = None,
    title: str = "Federated training",
) -> Path:
    """Plot per-round metrics (x = ``round``) to a PNG with matplotlib's Agg backend.

    ``keys`` defaults to every numeric key containing ``loss`` (or every numeric key if none does).
    Raises ValueError when there is nothing to plot or a requested key is absent from every round.
    """
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    rows = [r for r in round_metrics if "round" in r]
    if not rows:
        raise ValueError("plot_round_metrics: no rows with a 'round' key")
    numeric = sorted(
        {k for r in rows for k, v in r.items() if k != "round" and is_number(v)},
    )
    if keys is None:
        keys = [k for k in numeric if "loss" in k] or numeric
    missing = [k for k in keys if k not in numeric]
    if missing:
        raise ValueError(f"plot_round_metrics: key(s) {missing} not found in any round; have {numeric}")
    if not keys:
        raise ValueError("plot_round_metrics: no numeric metric to plot")
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    try:
        for key in keys:
            pts = sorted((int(r["round"]), float(r[key])) for r in rows if is_number(r.get(key)))
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=key)
        ax.set_xlabel("round")
        ax.set_ylabel("value")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out_png, format="png")
    finally:
        plt.close(fig)
    return out_png
