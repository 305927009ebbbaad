"""Time and peak memory of one optimisation step of every fine-tuning defense, as a ratio to SFT.

All run in this one invocation on the bundled model and the same 8 x 128-token batch:
  sft       plain task step (SDPA attention)
  surgery   + sink penalty read from the SDPA call of decoder-only pool forwards (ours)
  official  + two batch-1 eager forwards with output_attentions=True (Lslland/Surgery)
  lisa      a fine-tuning-state step with the proximal term active (an alignment-state step is an
            SFT step on an alignment batch)
  panacea   three forward/backward passes; its harmful batch is the same batch
Timing interleaves the variants round-robin in one process (so machine load hits all alike);
peak memory is each variant's peak RSS over 3 steps (after the first), in its own fresh
subprocess (CPU, Linux) or
torch.cuda.max_memory_allocated (GPU). Usage: python benchmarks/surgery_step.py [--json]
Long context: --seq 1024 --batch 1 --pool-len 1024 (pool texts packed to exactly that length).
--sink-alone: our sink pass alone (forward + backward of the sink values) against a plain decoder
forward + backward of the same tokens, e.g. --sink-alone --seq 4096; add --profile to attribute
the difference to operators (torch.profiler, one step of each, self CPU time).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time

import torch

VARIANTS = ("sft", "surgery", "official", "lisa", "panacea")


def packed(pool, length: int, count: int = 4) -> list[list[int]]:
    """`count` texts of exactly `length` tokens: pool texts concatenated in order, then cut."""
    out, cur = [], []
    for i in range(len(pool)):
        cur += pool[i]
        while len(cur) >= length:
            out.append(cur[:length])
            cur = cur[length:]
            if len(out) == count:
                return out
    raise SystemExit(f"the pool holds fewer than {count} x {length} tokens")


def build(variant: str, model_name: str, batch: int, seq: int, device: str, pool_len: int | None = None):
    """A trainer for `variant` and one fixed batch of real text (alpaca rows cut to `seq` tokens)."""
    from sinkguard.data import load_source
    from sinkguard.defenses import get_defense
    from sinkguard.models import load_model, load_tokenizer
    from sinkguard.train import make_config

    tok = load_tokenizer(model_name)
    model = load_model(model_name, device=device).train()
    ids = []
    for row in load_source("alpaca", "train"):
        t = tok(row["prompt"] + "\n" + row["response"])["input_ids"]
        if len(t) >= seq:
            ids.append(t[:seq])
        if len(ids) == batch:
            break
    x = torch.tensor(ids, device=device)
    inputs = {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x.clone()}
    defense = "surgery" if variant == "official" else variant
    extra = {"surgery": {"sink_impl": "sdpa"}, "official": {"sink_impl": "eager"},
             "lisa": {"alignment_steps": 0, "proximal_warmup_ratio": 0.0},  # always the fine-tuning state
             "panacea": {"harmful_batch_size": batch}}.get(variant, {})
    args = make_config(defense, "finetuning", tempfile.mkdtemp(), save_strategy="no",
                       per_device_train_batch_size=batch, use_cpu=device == "cpu", **extra)
    spec = get_defense(defense, "finetuning")
    if variant == "panacea":  # the harmful batch is the task batch itself: only the algorithm differs
        kw = {"harmful_set": [{"input_ids": t, "labels": t} for t in ids]}
    else:
        kw = spec.trainer_cls.defense_inputs(args, tok) if variant != "sft" else {}
        if kw and pool_len:
            kw = {name: packed(pool, pool_len) for name, pool in kw.items()}
    trainer = spec.trainer_cls(model=model, args=args, train_dataset=[{"input_ids": [0]}],
                               processing_class=tok, **kw)
    trainer.create_optimizer()
    trainer.current_gradient_accumulation_steps = 1  # set by train() in a real run
    if variant == "lisa":  # anchor taken at step 0, then a later step of the same state: proximal term on
        trainer.state.max_steps = 100
        trainer._ensure_anchor(model, 0)
        trainer.lisa_state, trainer.state.global_step = "finetune", 1
    return trainer, inputs


def step(trainer, inputs) -> None:
    """One optimisation step through the trainer's own training_step."""
    trainer.training_step(trainer.model, inputs)
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)


def peak_memory(variant: str, args) -> float | None:
    """Peak memory (MiB) of `variant` run alone for a few steps; None when its process died (the
    machine ran out of memory: the timings are still reported)."""
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        trainer, inputs = build(variant, args.model, args.batch, args.seq, "cuda", args.pool_len)
        for _ in range(3):
            step(trainer, inputs)
        return torch.cuda.max_memory_allocated() / 2**20
    proc = subprocess.run(
        [sys.executable, __file__, "--_memory-child", variant, "--model", args.model,
         "--batch", str(args.batch), "--seq", str(args.seq)]
        + (["--pool-len", str(args.pool_len)] if args.pool_len else []),
        capture_output=True, text=True,
    )
    if proc.returncode != 0:
        print(f"memory of {variant}: its process ended with code {proc.returncode} (killed for memory if "
              "negative); not measured", file=sys.stderr)
        return None
    return float(proc.stdout.strip().splitlines()[-1])


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else round(a / b, 3)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--pool-len", type=int, default=None,
                   help="pack pool texts to exactly this many tokens (default: the texts as drawn)")
    p.add_argument("--sink-alone", action="store_true",
                   help="time the sink pass alone vs a plain decoder forward + backward of --seq tokens")
    p.add_argument("--profile", action="store_true",
                   help="with --sink-alone: also print the operators that account for the extra time")
    p.add_argument("--steps", type=int, default=6, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help="comma-separated subset to measure (always with sft, the baseline; each variant "
                        "holds a model and its optimizer state in memory during the timed loop)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--_memory-child", dest="child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    variants = ["sft"] + [v for v in args.variants.split(",") if v and v != "sft"]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        p.error(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")

    if args.profile and (not args.sink_alone or args.device != "cpu"):
        p.error("--profile attributes CPU time: use it with --sink-alone --device cpu")
    if args.child:
        trainer, inputs = build(args.child, args.model, args.batch, args.seq, "cpu", args.pool_len)
        step(trainer, inputs)  # optimizer state allocated
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # reset the peak RSS (VmHWM): loading spikes are not the step's
        for _ in range(3):
            step(trainer, inputs)
        with open("/proc/self/status") as fh:
            hwm = next(line for line in fh if line.startswith("VmHWM"))
        print(int(hwm.split()[1]) / 1024)
        return

    torch.manual_seed(0)
    if args.sink_alone:
        sink_alone(args)
        return
    runs = {v: build(v, args.model, args.batch, args.seq, args.device, args.pool_len) for v in variants}
    times: dict[str, list[float]] = {v: [] for v in variants}
    for i in range(args.warmup + args.steps):
        for v in variants:  # round-robin: background load affects every variant alike
            if args.device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            step(*runs[v])
            if args.device == "cuda":
                torch.cuda.synchronize()
            if i >= args.warmup:
                times[v].append(time.perf_counter() - t0)
    del runs
    median = {v: sorted(t)[len(t) // 2] for v, t in times.items()}
    print(f"median step seconds: {json.dumps({v: round(t, 4) for v, t in median.items()})}", file=sys.stderr)
    memory = {v: peak_memory(v, args) for v in variants}
    result = {
        "device": args.device, "model": args.model, "batch": [args.batch, args.seq], "pool_len": args.pool_len,
        "threads": torch.get_num_threads(),
        "step_s": {v: round(median[v], 4) for v in variants},
        "peak_mib": {v: None if memory[v] is None else round(memory[v], 1) for v in variants},
        **{f"ratio_{v}_vs_sft_time": round(median[v] / median["sft"], 3) for v in variants[1:]},
        **{f"ratio_{v}_vs_sft_memory": ratio(memory[v], memory["sft"]) for v in variants[1:]},
    }
    if "surgery" in variants and "official" in variants:
        result["speedup_surgery_vs_official"] = round(median["official"] / median["surgery"], 3)
    if args.json:
        print(json.dumps(result))
        return
    print(f"device {args.device}, {args.model}, batch {args.batch} x {args.seq} tokens, "
          f"pool texts {args.pool_len or 'as drawn'}, median of {args.steps} steps")
    expected = {"surgery": "target time <= 1.25x, memory <= " + ("1.5x" if args.pool_len else "1.10x"),
                "official": "the official algorithm", "lisa": "expected about 1.0x", "panacea": "expected about 3x"}
    for v in variants:
        print(f"  {v:9s} step {median[v]:.3f} s   peak memory {result['peak_mib'][v]} MiB")
    for v in variants[1:]:
        print(f"  {v} / sft: time {result[f'ratio_{v}_vs_sft_time']:.3f}x, memory "
              f"{result[f'ratio_{v}_vs_sft_memory']}x  ({expected[v]})")
    if "speedup_surgery_vs_official" in result:
        print(f"  official / surgery time {result['speedup_surgery_vs_official']:.3f}x  (target >= 1.25; "
              ">= 1.4 at 1,024 tokens)")

def sink_alone(args) -> None:
    """Our sink pass (sink values, forward + backward) vs a plain decoder forward + backward."""
    from sinkguard.models import load_model
    from sinkguard.sink import sink_values, unwrap

    model = load_model(args.model, device=args.device).train()
    body = unwrap(model).get_decoder()
    x = torch.randint(100, 20000, (args.batch, args.seq), device=args.device)

    def plain() -> None:
        body(input_ids=x, use_cache=False).last_hidden_state.float().mean().backward()

    def sink() -> None:
        sink_values(model, x).sum().backward()

    times: dict[str, list[float]] = {"decoder": [], "sink": []}
    for i in range(args.warmup + args.steps):
        for name, fn in (("decoder", plain), ("sink", sink)):
            t0 = time.perf_counter()
            fn()
            model.zero_grad(set_to_none=True)
            if args.device == "cuda":
                torch.cuda.synchronize()
            if i >= args.warmup:
                times[name].append(time.perf_counter() - t0)
    median = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    if args.profile:
        profile_difference(plain, sink, model)
    result = {"device": args.device, "model": args.model, "tokens": [args.batch, args.seq],
              "threads": torch.get_num_threads(), "step_s": {k: round(v, 4) for k, v in median.items()},
              "ratio_sink_vs_decoder_time": round(median["sink"] / median["decoder"], 3)}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"sink pass alone, {args.batch} x {args.seq} tokens: decoder fwd+bwd {median['decoder']:.3f} s, "
              f"sink fwd+bwd {median['sink']:.3f} s, ratio {result['ratio_sink_vs_decoder_time']:.3f}x "
              "(target <= 1.1)")


def profile_difference(plain, sink, model, top: int = 6) -> None:
    """CPU self time per operator of one profiled step of each pass: where the sink pass spends more."""
    from torch.profiler import profile

    totals = {}
    for name, fn in (("decoder", plain), ("sink", sink)):
        with profile() as prof:
            fn()
        model.zero_grad(set_to_none=True)
        totals[name] = {e.key: e.self_cpu_time_total / 1e6 for e in prof.key_averages()}
    extra = {k: totals["sink"].get(k, 0.0) - totals["decoder"].get(k, 0.0) for k in totals["sink"] | totals["decoder"]}
    whole = sum(totals["sink"].values()) - sum(totals["decoder"].values())
    print(f"profiled step: decoder {sum(totals['decoder'].values()):.2f} s, sink {sum(totals['sink'].values()):.2f} s, "
          f"extra {whole:+.2f} s; largest operator differences (self time):", file=sys.stderr)
    for key, seconds in sorted(extra.items(), key=lambda kv: -abs(kv[1]))[:top]:
        print(f"  {seconds:+.3f} s  {key}", file=sys.stderr)


if __name__ == "__main__":
    from sinkguard.errors import SinkguardError

    try:
        main()
    except SinkguardError as exc:
        sys.exit(f"surgery_step.py: error: {exc}")
