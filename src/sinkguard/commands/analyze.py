"""`sinkguard analyze`: per-head sink divergence of a model on harmful vs harmless texts."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import add_data_root, add_model


def register(sub) -> None:
    p = sub.add_parser("analyze", help="sink divergence heatmap and count of positive heads",
                       description="Mean attention on the sink token, harmful minus harmless texts, "
                       "per (layer, head); writes sink_divergence.png and sink_divergence.json.")
    add_model(p)
    add_data_root(p)
    p.add_argument("--samples", type=int, default=64, help="texts per group (default %(default)s)")
    p.add_argument("--split", default="train", choices=["train", "validation", "test"],
                   help="beavertails split the texts come from (default: Surgery's pools, train)")
    p.add_argument("--sink-index", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(func=run)


def analyze(model_name: str, out: str | Path, samples: int = 64, split: str = "train",
            sink_index: int = 0, batch_size: int = 8, max_length: int = 512, data_root=None) -> dict:
    """Compute, save and return the divergence summary of `model_name` (JSON + heatmap in `out`)."""
    import torch

    from ..data import encode_text, load_source, reference_pools
    from ..errors import SinkguardError
    from ..models import load_model, load_tokenizer
    from ..report import plot_sink_heatmap
    from ..sink import count_positive, mean_sink_values
    from ..train import atomic_write_json

    if samples < 1:
        raise SinkguardError(f"--samples must be >= 1, got {samples}")
    if split == "train":
        harmful, harmless = reference_pools(data_root)
    else:
        rows = load_source("beavertails", split, data_root)
        harmful = [r for r in rows if not r["is_safe"]]
        harmless = [r for r in rows if r["is_safe"]]
    harmful, harmless = harmful[:samples], harmless[:samples]
    tokenizer = load_tokenizer(model_name)
    model = load_model(model_name).eval()

    def encode(rows):
        return [encode_text(tokenizer, r["prompt"], r["response"], max_length) for r in rows]

    with torch.no_grad():
        div = mean_sink_values(model, encode(harmful), tokenizer.pad_token_id, batch_size, sink_index,
                               "harmful") - mean_sink_values(
            model, encode(harmless), tokenizer.pad_token_id, batch_size, sink_index, "harmless")
    out = Path(out)
    positive = count_positive(div)
    summary = {
        "model": str(model_name), "positive_heads": positive, "total_heads": div.numel(),
        "layers": div.shape[0], "heads": div.shape[1], "mean_divergence": float(div.mean()),
        "settings": {"samples_harmful": len(harmful), "samples_harmless": len(harmless),
                     "split": split, "sink_index": sink_index, "max_length": max_length},
        "divergence": [[round(float(x), 7) for x in row] for row in div],
    }
    atomic_write_json(out / "sink_divergence.json", summary)
    plot_sink_heatmap(div, out / "sink_divergence.png",
                      f"{Path(str(model_name)).name}: {positive}/{div.numel()} heads with positive divergence")
    return summary


def run(args: argparse.Namespace) -> int:
    s = analyze(args.model, args.out, args.samples, args.split, args.sink_index, args.batch_size,
                args.max_length, args.data_root)
    print(f"positive-divergence heads: {s['positive_heads']} of {s['total_heads']} "
          f"(mean divergence {s['mean_divergence']:+.5f}); wrote {args.out}/sink_divergence.png and .json")
    return 0
