"""`ltsf` command line: `train` (official flag names), `grid` (a YAML list of runs), `table`."""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

from .config import LOSSES, LRADJ, NAMED_FIELDS, RunConfig
from .data import DATASET_KINDS, FEATURES
from .errors import LTSFError
from .models import MODELS

log = logging.getLogger("ltsf")

# Official flags accepted so that published commands run unchanged; they do not change a run.
_COMPAT = {"--is_training": int, "--model_id": str, "--des": str, "--num_workers": int,
           "--label_len": int, "--freq": str, "--embed": str, "--gpu": int, "--itr": int}


def _add_train_flags(p: argparse.ArgumentParser) -> None:
    d = RunConfig()
    g = p.add_argument_group("official flags (same names and defaults as the run scripts)")
    g.add_argument("--model", default=d.model, choices=MODELS)
    g.add_argument("--data", default=d.data, choices=list(DATASET_KINDS),
                   help="dataset type: ETTh1/2, ETTm1/2 (12/4/4-month split), custom (0.7/0.1/0.2), Solar")
    g.add_argument("--root_path", "--data-root", dest="root_path", default=None,
                   help="folder holding the data files (default: $LTSF_DATA, else ../shared/data/ltsf)")
    g.add_argument("--data_path", default=None, help="file under the root (default <data>.csv)")
    g.add_argument("--features", default=d.features, choices=FEATURES)
    g.add_argument("--target", default=d.target)
    g.add_argument("--seq_len", type=int, default=d.seq_len)
    g.add_argument("--pred_len", type=int, default=d.pred_len)
    g.add_argument("--enc_in", type=int, default=None, help="channels (default: from the data)")
    g.add_argument("--cycle", type=int, default=None,
                   help="cycle length W for CycleNet / RCF (default per dataset: ETT hourly 24, "
                        "ETT 15-min 96, weather / solar 144, electricity / traffic 168)")
    g.add_argument("--model_type", default=d.model_type, choices=("linear", "mlp"))
    g.add_argument("--use_revin", "--revin", dest="use_revin", type=int, default=None,
                   help="1/0 instance normalisation (default: CycleNet 1, SegRNN 0 = last value)")
    g.add_argument("--seg_len", type=int, default=d.seg_len)
    g.add_argument("--d_model", type=int, default=d.d_model)
    g.add_argument("--dropout", type=float, default=None, help="SegRNN head dropout (default 0.5)")
    g.add_argument("--rnn_type", default=d.rnn_type, choices=("rnn", "gru", "lstm"))
    g.add_argument("--dec_way", default=d.dec_way, choices=("pmf", "rmf"))
    g.add_argument("--channel_id", type=int, default=d.channel_id, choices=(0, 1))
    g.add_argument("--individual", type=int, default=d.individual,
                   help="DLinear: 1 = one pair of linear layers per channel")
    g.add_argument("--train_epochs", type=int, default=d.train_epochs)
    g.add_argument("--patience", type=int, default=d.patience)
    g.add_argument("--batch_size", type=int, default=None,
                   help="default per dataset as the official scripts (ETT / weather 256, "
                        "electricity / traffic / solar 64, other data 128)")
    g.add_argument("--learning_rate", type=float, default=d.learning_rate)
    g.add_argument("--lradj", default=d.lradj, choices=LRADJ)
    g.add_argument("--pct_start", type=float, default=d.pct_start)
    g.add_argument("--loss", default=d.loss, choices=LOSSES)
    g.add_argument("--random_seed", type=int, default=d.random_seed)
    g.add_argument("--checkpoints", default=d.checkpoints,
                   help="runs folder; each run writes <checkpoints>/<setting>/")
    for flag, typ in _COMPAT.items():
        g.add_argument(flag, type=typ, default=None, help=argparse.SUPPRESS)
    o = p.add_argument_group("options of this implementation")
    o.add_argument("--rcf", type=int, default=None,
                   help="1: wrap the model in Residual Cycle Forecasting (CycleNet's learned "
                        "cycle); CycleNet has it built in")
    o.add_argument("--cyclenet_loss_flag", type=int, default=d.cyclenet_loss_flag,
                   help="0 (official): CycleNet always trains with MSE; 1: it follows --loss")
    o.add_argument("--tag", default=d.tag, help="text appended to the run folder name")
    o.add_argument("--onecycle_init", type=int, default=d.onecycle_init, choices=(0, 1),
                   help="1 (official): build OneCycleLR for every --lradj, which runs epoch 1 at "
                        "learning_rate/25 and sets Adam's beta1 to 0.95; 0: plain Adam")
    o.add_argument("--test_each_epoch", type=int, default=d.test_each_epoch, choices=(0, 1),
                   help="log the test loss every epoch as the official loop (1) or skip it (0)")
    o.add_argument("--num_threads", type=int, default=d.num_threads,
                   help="torch CPU threads (0: torch default)")
    o.add_argument("--device", default=d.device,
                   help="auto (CUDA when available, as the official --use_gpu), cpu, cuda, cuda:1")
    o.add_argument("--config", default=None, help="YAML file with any of these keys as defaults")


def _config_from_args(args: argparse.Namespace) -> RunConfig:
    if args.is_training not in (None, 1):
        raise LTSFError("only training runs are supported (--is_training 1); "
                        "use the Python API to reload a saved run")
    if args.itr not in (None, 1):
        raise LTSFError("--itr must be 1; run several --random_seed values instead")
    names = {f.name for f in fields(RunConfig)}
    return RunConfig(**{k: v for k, v in vars(args).items() if k in names}).validate()


def _load_yaml(path: str) -> dict[str, Any]:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise LTSFError(f"config file {p} not found")
    try:
        content = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError:
        raise LTSFError(f"{p}: not UTF-8 text; save the YAML file as UTF-8") from None
    except yaml.YAMLError as exc:
        raise LTSFError(f"{p}: invalid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(content, dict):
        raise LTSFError(f"{p}: expected a mapping of flag names to values")
    return content


def _summary(result: dict[str, Any]) -> dict[str, Any]:
    keys = ("setting", "mse", "mae", "epochs_run", "best_epoch", "params", "time_per_epoch_s",
            "wall_time_s", "cached")
    return {k: result[k] for k in keys if k in result}


def cmd_train(args: argparse.Namespace) -> int:
    """`ltsf train`: one run; prints a summary line or (`--json`) one JSON object."""
    from .train import run

    cfg = _config_from_args(args)
    result = run(cfg, overwrite=args.overwrite, progress=not args.quiet and not args.json)
    if args.json:
        print(json.dumps(_summary(result)))
    else:
        cached = " (cached)" if result.get("cached") else ""
        print(f"{result['setting']}: mse {result['mse']:.4f} mae {result['mae']:.4f} "
              f"epochs {result['epochs_run']} params {result['params']} "
              f"wall {result['wall_time_s']:.0f}s{cached}")
    return 0


def _config_defaults(argv: list[str]) -> dict[str, Any]:
    """Values of the YAML file named by `--config` in `argv` (empty when absent)."""
    path = None
    for i, a in enumerate(argv):
        if a == "--config":
            if i + 1 >= len(argv):
                raise LTSFError("--config needs a YAML file path")
            path = argv[i + 1]
        elif a.startswith("--config="):
            path = a.split("=", 1)[1]
    if path is None:
        return {}
    values = _load_yaml(path)
    unknown = sorted(set(values) - {f.name for f in fields(RunConfig)})
    if unknown:
        raise LTSFError(f"{path}: unknown key(s) {', '.join(unknown)}")
    return values


def _grid_tag(swept: dict[str, Any]) -> str:
    """Folder-name suffix for swept keys that the run name does not already show (`lr0.01_bs64`)."""
    short = {"learning_rate": "lr", "batch_size": "bs", "train_epochs": "ep", "d_model": "dm",
             "dropout": "do", "patience": "pat"}
    return "_".join(f"{short.get(k, k)}{v}" for k, v in swept.items() if k not in NAMED_FIELDS)


def grid_configs(path: str) -> list[RunConfig]:
    """Expand a grid YAML (`defaults`, `experiments` with optional `grid` lists) into configs.

    Every swept key shows in the run folder name: keys the name does not already contain are
    appended as a tag, so a grid over learning rate x batch size gives distinct folders.
    """
    spec = _load_yaml(path)
    defaults = spec.get("defaults", {}) or {}
    if not isinstance(defaults, dict):
        raise LTSFError(f"{path}: 'defaults' must be a mapping of flag names to values")
    exps = spec.get("experiments")
    if not isinstance(exps, list) or not exps:
        raise LTSFError(f"{path}: needs a non-empty 'experiments' list")
    configs = []
    for n, exp in enumerate(exps, 1):
        if not isinstance(exp, dict):
            raise LTSFError(f"{path}: experiment {n} must be a mapping of flag names to values")
        exp = dict(exp)
        grid = exp.pop("grid", {}) or {}
        exp.pop("name", None)
        if not isinstance(grid, dict):
            raise LTSFError(f"{path}: experiment {n}: 'grid' must map flag names to lists of values")
        for key, values in grid.items():
            if not isinstance(values, list) or not values:
                raise LTSFError(f"{path}: experiment {n}: grid key {key!r} needs a non-empty list "
                                f"of values, got {values!r}; write {key}: [{values}]")
        keys = list(grid)
        for values in itertools.product(*(grid[k] for k in keys)):
            swept = dict(zip(keys, values, strict=True))
            merged = {**defaults, **exp, **swept}
            tag = _grid_tag(swept)
            if tag:
                merged["tag"] = f"{merged['tag']}_{tag}" if merged.get("tag") else tag
            configs.append(RunConfig.from_dict(merged).validate())
    names = [c.setting for c in configs]
    dupes = sorted({s for s in names if names.count(s) > 1})
    if dupes:
        raise LTSFError(f"{path}: {len(dupes)} run name(s) occur twice (e.g. {dupes[0]}); give "
                        "the experiments different settings or a distinct 'tag'")
    return configs


def cmd_grid(args: argparse.Namespace) -> int:
    """`ltsf grid FILE`: run every configuration of a grid (finished runs are skipped)."""
    from .train import run

    configs = grid_configs(args.file)
    if args.seeds:
        configs = [c for c in configs if c.random_seed in args.seeds]
    if args.order == "seed":
        configs.sort(key=lambda c: c.random_seed)
    if args.list:
        for c in configs:
            print(c.setting)
        return 0
    for i, cfg in enumerate(configs, 1):
        result = run(cfg, overwrite=False, progress=not args.quiet)
        log.info("[%d/%d] %s", i, len(configs), json.dumps(_summary(result)))
        print(json.dumps(_summary(result)), flush=True)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    """`ltsf predict`: forecasts in the data's units as CSV + PNG (+ metrics when known)."""
    from .predict import predict_checkpoint, predict_run

    if (args.run is None) == (args.checkpoint is None):
        raise LTSFError("give exactly one of --run RUN_DIR or --checkpoint PATH")
    if args.checkpoint is not None:
        if args.data is None:
            raise LTSFError("--checkpoint needs --data FILE (the series to forecast)")
        flags = {k: getattr(args, k) for k in ("seq_len", "pred_len", "use_revin", "enc_in", "cycle")
                 if getattr(args, k) is not None}
        out = predict_checkpoint(args.checkpoint, args.data, args.out, model=args.model,
                                 data_kind=args.data_kind, split=args.split, windows=args.windows,
                                 channels=args.channels, **flags)
    else:
        out = predict_run(args.run, args.out, data=args.data, split=args.split,
                          windows=args.windows, channels=args.channels)
    summary = {"csv": out["csv"], "png": out["png"]}
    if "metrics" in out:
        summary.update({k: round(v, 6) for k, v in out["metrics"].items() if isinstance(v, float)})
    print(json.dumps(summary))
    return 0


def cmd_table(args: argparse.Namespace) -> int:
    """`ltsf table PATH...`: markdown table of results (to stdout or --out)."""
    from .io import write_text
    from .table import load_results, markdown_table, rcf_table

    results = load_results(args.paths)
    text = rcf_table(results) if args.rcf else markdown_table(results, published=not args.no_published)
    if args.out:
        write_text(args.out, text)
    else:
        print(text, end="")
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line usage on errors (the full usage is in `-h`)."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"usage: {self.prog} [options] (see {self.prog} -h)\n{self.prog}: error: {message}\n")


def build_parser(train_defaults: dict[str, Any] | None = None) -> argparse.ArgumentParser:
    """The `ltsf` argument parser; `train_defaults` (from `--config`) override flag defaults."""
    parser = _Parser(prog="ltsf", description="CycleNet, SegRNN and Linear "
                                     "forecasters on the standard LTSF benchmarks.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every epoch")
    sub = parser.add_subparsers(dest="command", required=True)
    tr = sub.add_parser("train", help="train and test one model (official flag names)")
    _add_train_flags(tr)
    tr.add_argument("--json", action="store_true", help="print one JSON object: mse, mae, epochs, params")
    tr.add_argument("--overwrite", action="store_true", help="rerun even if results exist")
    tr.add_argument("--quiet", action="store_true", help="no progress bar")
    tr.set_defaults(func=cmd_train, **(train_defaults or {}))
    gr = sub.add_parser("grid", help="run a YAML grid of runs, skipping finished ones")
    gr.add_argument("file")
    gr.add_argument("--seeds", type=int, nargs="*", default=None, help="only these random seeds")
    gr.add_argument("--order", choices=("file", "seed"), default="file",
                    help="'seed': all runs of the first seed before the next seed")
    gr.add_argument("--list", action="store_true", help="only list the runs")
    gr.add_argument("--quiet", action="store_true", help="no progress bars")
    gr.set_defaults(func=cmd_grid)
    pr = sub.add_parser("predict", help="forecasts of a run or an official checkpoint as CSV + PNG")
    pr.add_argument("--run", default=None, help="run folder written by `ltsf train`")
    pr.add_argument("--checkpoint", default=None, help="official CycleNet/SegRNN checkpoint.pth")
    pr.add_argument("--data", default=None,
                    help="CSV to forecast (default for --run: the run's own data file)")
    pr.add_argument("--split", choices=("test", "future"), default="test",
                    help="test: windows of the test part (actual known); future: past the file's end")
    pr.add_argument("--windows", default="last", help="last (default), all, or the last N windows")
    pr.add_argument("--channels", nargs="+", default=None,
                    help="channels to plot (default: the last column, the target)")
    pr.add_argument("--out", required=True, help="output folder")
    ck = pr.add_argument_group("with --checkpoint (official flag names; sizes are read from it)")
    ck.add_argument("--model", default="CycleNet", choices=("CycleNet", "SegRNN", "Linear", "DLinear"))
    ck.add_argument("--data_kind", default=None, choices=list(DATASET_KINDS),
                    help="official --data name for the split (default: from the file name)")
    for flag in ("--seq_len", "--pred_len", "--use_revin", "--enc_in", "--cycle"):
        ck.add_argument(flag, type=int, default=None)
    pr.set_defaults(func=cmd_predict)
    tb = sub.add_parser("table", help="markdown table from results.json files or folders")
    tb.add_argument("paths", nargs="+")
    tb.add_argument("--out", default=None, help="write the table to this file")
    tb.add_argument("--no-published", action="store_true", help="omit the published columns")
    tb.add_argument("--rcf", action="store_true",
                    help="the RCF plug-in comparison: each backbone with and without RCF")
    tb.set_defaults(func=cmd_table)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point; user mistakes print one `ltsf: error: ...` line and exit with status 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        parser = build_parser(_config_defaults(argv) if argv[:1] == ["train"] else None)
        args = parser.parse_args(argv)
        logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                            format="%(asctime)s %(levelname)s %(message)s")
        return args.func(args)
    except LTSFError as exc:
        print(f"ltsf: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ltsf: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `ltsf grid --list | head`
        return 0


if __name__ == "__main__":
    sys.exit(main())
