"""Training time per epoch and parameter count of CycleNet and SegRNN against the Linear baseline.

One run, same data, batch size, threads and horizons for every model; prints a markdown table
with ratios to Linear. Data: ETTh1 from the data root (`LTSF_DATA` / `--data-root`), or a
synthetic series of the same size when the file is absent.

    .venv/bin/python benchmarks/ltsf_speed.py --threads 1 --pred-lens 96 720
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ltsf import LTSFError, RunConfig, SeriesData, build_model, count_parameters, make_splits
from ltsf.data import load_benchmark
from ltsf.train import make_loader

MODELS = [
    ("Linear", {"model": "Linear"}),
    ("CycleNet/Linear", {"model": "CycleNet", "model_type": "linear"}),
    ("CycleNet/MLP", {"model": "CycleNet", "model_type": "mlp"}),
    ("SegRNN", {"model": "SegRNN", "seg_len": 24, "dropout": 0.5}),
]


def load_data(root: str | None, seq_len: int, pred_len: int):
    """ETTh1 splits, or a synthetic ETTh1-sized series (7 channels, daily cycle) if absent."""
    try:
        return load_benchmark("ETTh1", None, root, seq_len, pred_len, cycle=24), "ETTh1"
    except LTSFError:
        rng = np.random.default_rng(0)
        t = np.arange(17420)[:, None]
        values = np.sin(2 * np.pi * t / 24 + np.arange(7)) + 0.3 * rng.normal(size=(17420, 7))
        series = SeriesData(values, [f"c{i}" for i in range(7)])
        return make_splits(series, "ETTh", seq_len, pred_len, cycle=24), "synthetic (ETTh1 size)"


def epoch_seconds(model: torch.nn.Module, loader, warmup: int,
                  max_batches: int | None) -> tuple[float, float]:
    """Wall and CPU seconds of one training epoch (forward, MSE, backward, Adam step).

    CPU time (this process) is reported beside wall time because on a shared machine wall time
    also counts waiting for a core.
    """
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    loss_fn = torch.nn.MSELoss()
    model.train()

    def step(x, y, p):
        opt.zero_grad()
        out = model(x, p) if getattr(model, "needs_phase", False) else model(x)
        loss_fn(out, y).backward()
        opt.step()

    batches = list(loader)
    for x, y, p in batches[:warmup]:
        step(x, y, p)
    todo = batches[:max_batches] if max_batches else batches
    t0, c0 = time.perf_counter(), time.process_time()
    for x, y, p in todo:
        step(x, y, p)
    scale = len(batches) / len(todo)
    return (time.perf_counter() - t0) * scale, (time.process_time() - c0) * scale


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the table (and optionally write JSON)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--seq-len", type=int, default=96)
    ap.add_argument("--pred-lens", type=int, nargs="+", default=[96, 720])
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=2, help="untimed batches first")
    ap.add_argument("--max-batches", type=int, default=None,
                    help="time only this many batches and scale to a full epoch")
    ap.add_argument("--with-literal-pmf", action="store_true",
                    help="also time SegRNN with the literal repeated-RNN PMF step")
    ap.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    models = list(MODELS)
    if args.with_literal_pmf:
        models.append(("SegRNN (literal PMF)", {"model": "SegRNN", "seg_len": 24, "dropout": 0.5,
                                                "literal": True}))
    rows = []
    for pred_len in args.pred_lens:
        data, source = load_data(args.data_root, args.seq_len, pred_len)
        loader = make_loader(data.train, args.batch_size, shuffle=True, drop_last=True)
        for label, spec in models:
            spec = dict(spec)
            literal = spec.pop("literal", False)
            cfg = RunConfig(seq_len=args.seq_len, pred_len=pred_len, cycle=24, **spec)
            torch.manual_seed(2024)
            model = build_model(cfg, data.n_channels)
            if literal:
                model.factorized_pmf = False
            secs, cpu = epoch_seconds(model, loader, args.warmup, args.max_batches)
            rows.append({"model": label, "pred_len": pred_len, "params": count_parameters(model),
                         "epoch_s": secs, "epoch_cpu_s": cpu, "batches": len(loader)})
            print(f"  {label:22s} H={pred_len:<4d} {secs:8.2f} s/epoch ({cpu:.2f} CPU s)",
                  file=sys.stderr, flush=True)
    print(f"\nData: {source}, L={args.seq_len}, batch {args.batch_size}, {args.threads} thread(s), "
          f"torch {torch.__version__}\n")
    print("| model | H | params | params / Linear | wall s/epoch | CPU s/epoch | CPU time / Linear |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        base = next(b for b in rows if b["model"] == "Linear" and b["pred_len"] == r["pred_len"])
        print(f"| {r['model']} | {r['pred_len']} | {r['params']:,} | "
              f"{r['params'] / base['params']:.2f}x | {r['epoch_s']:.2f} | {r['epoch_cpu_s']:.2f} | "
              f"{r['epoch_cpu_s'] / base['epoch_cpu_s']:.1f}x |")
    if args.json:
        Path(args.json).write_text(json.dumps({"source": source, "threads": args.threads,
                                               "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
