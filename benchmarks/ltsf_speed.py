"""Training time per epoch, inference ms per sample, training memory and parameters of every ltsf
model, with and without the RCF plug-in, against the Linear baseline.

One run, same data, batch size, threads and horizons for every model; prints a markdown table
with ratios to Linear. Training memory is counted, not sampled: parameters + gradients + Adam
moments + the tensors autograd saves for the backward pass of one batch (the peak on any
device, less allocator overhead); inference time is CPU ms per test window in eval mode. Data: ETTh1 from the data root (`LTSF_DATA` / `--data-root`), or a
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
    ("Linear+RCF", {"model": "Linear", "rcf": 1}),
    ("RLinear", {"model": "Linear", "use_revin": 1}),
    ("CycleNet/Linear", {"model": "CycleNet", "model_type": "linear"}),
    ("RMLP", {"model": "MLP", "use_revin": 1}),
    ("CycleNet/MLP", {"model": "CycleNet", "model_type": "mlp"}),
    ("DLinear", {"model": "DLinear"}),
    ("DLinear+RCF", {"model": "DLinear", "rcf": 1}),
    ("SegRNN", {"model": "SegRNN", "seg_len": 24, "dropout": 0.5}),
    ("SegRNN+RCF", {"model": "SegRNN", "seg_len": 24, "dropout": 0.5, "rcf": 1}),
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


def train_memory_bytes(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, p: torch.Tensor) -> int:
    """Parameters + gradients + Adam's two moments + tensors saved for backward, for one batch."""
    n_param = sum(q.numel() * q.element_size() for q in model.parameters())
    saved: dict[tuple[int, int], int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.device.type != "meta":
            saved[(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())] = t.untyped_storage().nbytes()
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x, p) if getattr(model, "needs_phase", False) else model(x)
        loss = torch.nn.functional.mse_loss(out, y)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return 4 * n_param + sum(saved.values())


@torch.no_grad()
def inference_ms_per_sample(model: torch.nn.Module, loader) -> float:
    """CPU milliseconds per window of a full pass over `loader` in eval mode."""
    model.eval()
    n, c0 = 0, time.process_time()
    for x, _, p in loader:
        model(x, p) if getattr(model, "needs_phase", False) else model(x)
        n += x.shape[0]
    return 1000.0 * (time.process_time() - c0) / max(n, 1)


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
        test_loader = make_loader(data.test, args.batch_size, shuffle=False, drop_last=False)
        x0, y0, p0 = next(iter(loader))
        for label, spec in models:
            spec = dict(spec)
            literal = spec.pop("literal", False)
            cfg = RunConfig(seq_len=args.seq_len, pred_len=pred_len, cycle=24, **spec)
            torch.manual_seed(2024)
            model = build_model(cfg, data.n_channels)
            if literal:
                model.factorized_pmf = False
            secs, cpu = epoch_seconds(model, loader, args.warmup, args.max_batches)
            mem = train_memory_bytes(model, x0, y0, p0)
            ms = inference_ms_per_sample(model, test_loader)
            rows.append({"model": label, "pred_len": pred_len, "params": count_parameters(model),
                         "epoch_s": secs, "epoch_cpu_s": cpu, "batches": len(loader),
                         "train_mem_mib": mem / 2 ** 20, "infer_ms_per_sample": ms})
            print(f"  {label:22s} H={pred_len:<4d} {secs:8.2f} s/epoch ({cpu:.2f} CPU s)",
                  file=sys.stderr, flush=True)
    print(f"\nData: {source}, L={args.seq_len}, batch {args.batch_size}, {args.threads} thread(s), "
          f"torch {torch.__version__}\n")
    print("| model | H | params | params / Linear | wall s/epoch | CPU s/epoch | CPU time / Linear "
          "| infer ms/sample | infer / Linear | train MiB | train MiB / Linear |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        base = next(b for b in rows if b["model"] == "Linear" and b["pred_len"] == r["pred_len"])
        print(f"| {r['model']} | {r['pred_len']} | {r['params']:,} | "
              f"{r['params'] / base['params']:.2f}x | {r['epoch_s']:.2f} | {r['epoch_cpu_s']:.2f} | "
              f"{r['epoch_cpu_s'] / base['epoch_cpu_s']:.1f}x | {r['infer_ms_per_sample']:.4f} | "
              f"{r['infer_ms_per_sample'] / base['infer_ms_per_sample']:.1f}x | "
              f"{r['train_mem_mib']:.1f} | {r['train_mem_mib'] / base['train_mem_mib']:.1f}x |")
    if args.json:
        Path(args.json).write_text(json.dumps({"source": source, "threads": args.threads,
                                               "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
