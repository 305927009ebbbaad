"""Plots and tables: sink-divergence heatmaps, HS/FA tables and curves."""

from __future__ import annotations

import os
from pathlib import Path

import torch


def plot_sink_heatmap(divergence: torch.Tensor, path: str | os.PathLike, title: str = "") -> Path:
    """Save a per-(layer, head) heatmap of the sink divergence (red: harmful > harmless)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = divergence.detach().float().cpu().numpy()
    bound = float(abs(data).max()) or 1.0
    n_layers, n_heads = data.shape
    fig, ax = plt.subplots(figsize=(max(6.5, 0.45 * n_heads + 2), max(3.0, 0.22 * n_layers + 1.5)))
    im = ax.imshow(data, cmap="RdBu_r", vmin=-bound, vmax=bound, aspect="auto", origin="lower")
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(n_heads))
    positive = int((divergence > 0).sum())
    ax.set_title(title or f"sink divergence (harmful - harmless): {positive}/{data.size} heads > 0",
                 fontsize=9)
    fig.colorbar(im, ax=ax, label="attention on sink: harmful - harmless")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
    return path
