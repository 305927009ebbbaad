"""Run a whole study from one YAML config: align -> fine-tune grid -> evaluate -> results.json.

Every stage lives in `RUN_DIR/stages/<kind>-<hash>/`, the hash covering the stage's settings and
everything upstream, so a grid reuses one aligned model and an interrupted study resumes where it
stopped (finished stages are skipped, unfinished ones resume from their checkpoints).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import SinkguardError
from .train import atomic_write_json

log = logging.getLogger(__name__)

STAGE_DEFAULTS: dict[str, dict[str, Any]] = {
    "alignment": dict(defenses=["sft"], samples=2000, epochs=1, max_steps=-1, lr=1e-3, batch_size=10,
                      grad_accum=1, max_length=512, lora=dict(r=8, alpha=4, dropout=0.1),
                      system_prompt=None, options={}),
    "finetuning": dict(defenses=["sft"], tasks=["sst2"], poison_ratios=[0.1], attack="beavertails",
                       samples=1000, epochs=1, max_steps=-1, lr=5e-6, batch_size=10, grad_accum=1,
                       max_length=512, lora=None, system_prompt="You are a helpful assistant.",
                       options={}),
    "evaluation": dict(hs_sets=["beavertails", "harmbench", "strongreject"], hs_limit=100, benign_limit=200,
                       fa_limit=200, max_new_tokens=64, fa_max_new_tokens=None, batch_size=16, template="chat",
                       analyze_samples=32, evaluate_base=True, evaluate_aligned=True,
                       correction_source="beavertails"),
}


@dataclass
class ExperimentConfig:
    """A study: the model, seeds, and the settings of each stage (see configs/*.yaml)."""

    name: str = "experiment"
    model: str = "smollm2-135m-instruct"
    seeds: list[int] = field(default_factory=lambda: [43])
    data_root: str | None = None
    alignment: dict[str, Any] | None = field(default_factory=dict)
    finetuning: dict[str, Any] = field(default_factory=dict)
    evaluation: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for stage in STAGE_DEFAULTS:
            given = getattr(self, stage)
            if given is None and stage == "alignment":
                continue  # no alignment stage: fine-tune the model as given
            unknown = sorted(set(given or {}) - set(STAGE_DEFAULTS[stage]))
            if unknown:
                raise SinkguardError(
                    f"config section {stage!r}: unknown key(s) {', '.join(unknown)}; "
                    f"known: {', '.join(STAGE_DEFAULTS[stage])}"
                )
            setattr(self, stage, {**copy.deepcopy(STAGE_DEFAULTS[stage]), **(given or {})})
        for section in (self.alignment, self.finetuning):
            if section is not None and not isinstance(section["options"], dict):
                raise SinkguardError("'options' must map a defense name to its settings")
        if self.alignment is not None and isinstance(self.alignment["defenses"], str):
            self.alignment["defenses"] = [self.alignment["defenses"]]
        ft = self.finetuning
        for p in ft["poison_ratios"]:
            if not 0 <= float(p) <= 1:
                raise SinkguardError(f"poison ratio {p} is outside [0, 1]")
        if not self.seeds:
            raise SinkguardError("seeds must list at least one seed")

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> ExperimentConfig:
        """Read a config file; unknown keys and bad values are clear errors."""
        path = Path(path)
        if not path.is_file():
            raise SinkguardError(f"config file {path} not found")
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise SinkguardError(f"{path} is not valid YAML: {exc}") from None
        known = {"name", "model", "seeds", "data_root", "alignment", "finetuning", "evaluation"}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise SinkguardError(f"{path}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**raw)


def stage_hash(*parts: Any) -> str:
    """Short stable hash of JSON-able settings."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:10]


def _overrides(stage: dict, seed: int) -> dict:
    return dict(num_train_epochs=stage["epochs"], max_steps=stage["max_steps"], learning_rate=stage["lr"],
                per_device_train_batch_size=stage["batch_size"],
                gradient_accumulation_steps=stage["grad_accum"], max_length=stage["max_length"], seed=seed)


class Experiment:
    """Runs the flow of docs/architecture.md for one config into `run_dir`."""

    def __init__(self, config: ExperimentConfig, run_dir: str | os.PathLike, judge=None) -> None:
        self.config = config
        self.run_dir = Path(run_dir)
        self.judge = judge

    # ------------------------------------------------------------------ stages
    def align(self, defense: str, seed: int) -> tuple[str, str]:
        """(model path, stage hash) of the model aligned with `defense`."""
        from .data import alignment_dataset
        from .train import run_stage

        cfg = self.config
        a = {k: v for k, v in cfg.alignment.items() if k != "defenses"}
        a["defense"], a["options"] = defense, a["options"].get(defense, {})
        h = stage_hash("alignment", cfg.model, a, seed)
        out = self.run_dir / "stages" / f"align-{defense}-{h}"
        rows = alignment_dataset(a["samples"], cfg.data_root)
        path = run_stage("alignment", defense, cfg.model, rows, out, lora=a["lora"],
                         system_prompt=a["system_prompt"], data_root=cfg.data_root,
                         settings={"seed": seed, **a}, **_overrides(a, seed), **a["options"])
        return str(path), h

    def finetune(self, base: str, base_hash: str, defense: str, task: str, p: float, seed: int) -> tuple[str, str]:
        """(model path, stage hash) of one fine-tuning run of the grid."""
        from .data import poisoned_dataset
        from .train import run_stage

        f = self.config.finetuning
        options = f["options"].get(defense, {})
        settings = {k: v for k, v in f.items() if k not in ("defenses", "tasks", "poison_ratios", "options")}
        h = stage_hash("finetuning", base_hash, defense, task, p, seed, settings, options)
        out = self.run_dir / "stages" / f"ft-{defense}-{task}-p{p}-s{seed}-{h}"
        rows = poisoned_dataset(task, f["samples"], p, f["attack"], seed, self.config.data_root)
        path = run_stage("finetuning", defense, base, rows, out, lora=f["lora"],
                         system_prompt=f["system_prompt"], data_root=self.config.data_root,
                         settings={"defense": defense, "task": task, "poison_ratio": p, "seed": seed,
                                   **settings, "options": options},
                         **_overrides(f, seed), **options)
        return str(path), h

    def evaluate(self, model_path: str, model_hash: str, task: str) -> dict:
        """HS (+ refusal rate) on the configured prompt sets, over-refusal, FA on `task`, sink divergence.

        Answers are cached per model and generation settings, verdicts per judge identity
        (`sinkguard.evaluate.study`): a new judge re-scores without generating again.
        """
        from .evaluate.study import evaluate_model

        e = self.config.evaluation
        generation = {k: v for k, v in e.items() if k != "correction_source"}  # verdict-only setting
        out = self.run_dir / "stages" / f"eval-{stage_hash('evaluation', model_hash, task, generation)}"
        if self.judge is None:
            from .evaluate.judge import load_judge

            self.judge = load_judge(auto_train=True, root=self.config.data_root)
        exclude = []
        if task == "alpaca" and e["benign_limit"]:  # its train rows may be fine-tuned on
            from .data import load_source

            exclude = [r["prompt"] for r in load_source("alpaca", "train", self.config.data_root)]
            log.warning("task alpaca: over-refusal measured on the %d held-out AlpacaEval prompts only",
                        len(load_source("alpaca", "test", self.config.data_root)))
        return evaluate_model(model_path, out, task, e, self.judge, self.config.data_root, exclude)

    # ------------------------------------------------------------------ flow
    def run(self) -> dict:
        """Run (or resume) every stage; write and return `results.json`."""
        cfg = self.config
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.yaml").write_text(yaml.safe_dump(
            {k: getattr(cfg, k) for k in ("name", "model", "seeds", "data_root", "alignment", "finetuning",
                                          "evaluation")}, sort_keys=False))
        f, e = cfg.finetuning, cfg.evaluation
        records = []
        timings: dict[str, float] = {}

        def timed(name: str, fn, *args):
            t0 = time.time()
            out = fn(*args)
            timings[name] = round(timings.get(name, 0) + time.time() - t0, 1)
            return out

        # Train everything first, then evaluate: training needs no judge, and a crash in
        # evaluation never costs a trained model.
        jobs = []  # (alignment, label, task, p, seed, model path, model hash)
        aligners = cfg.alignment["defenses"] if cfg.alignment is not None else ["none"]
        for seed in cfg.seeds:
            for aligner in aligners:
                if cfg.alignment is None:
                    aligned, a_hash = cfg.model, stage_hash(cfg.model)
                else:
                    aligned, a_hash = timed("alignment", self.align, aligner, seed)
                for task in f["tasks"]:
                    if e["evaluate_base"] and cfg.alignment is not None and aligner == aligners[0]:
                        jobs.append(("none", "base", task, None, seed, cfg.model, stage_hash(cfg.model)))
                    if e["evaluate_aligned"]:
                        jobs.append((aligner, "aligned", task, None, seed, aligned, a_hash))
                    for defense in f["defenses"]:
                        for p in f["poison_ratios"]:
                            path, h = timed("finetuning", self.finetune, aligned, a_hash, defense, task,
                                            float(p), seed)
                            jobs.append((aligner, defense, task, float(p), seed, path, h))
        for aligner, label, task, p, seed, path, h in jobs:
            r = timed("evaluation", self.evaluate, path, h, task)
            records.append(self._record(aligner, label, task, p, seed, r))
        results = {"name": cfg.name, "model": cfg.model, "records": records, "stage_wall_s": timings}
        atomic_write_json(self.run_dir / "results.json", results)
        return results

    @staticmethod
    def _record(alignment: str, defense: str, task: str, p: float | None, seed: int, r: dict) -> dict:
        from .report import record_fields

        rec = {"alignment": alignment, "defense": defense, "task": task, "poison_ratio": p, "seed": seed}
        return rec | record_fields(r)


def run_experiment(config: str | os.PathLike | ExperimentConfig, run_dir: str | os.PathLike | None = None,
                   judge=None) -> dict:
    """Load a config (path or object) and run it into `run_dir` (default `runs/<name>`)."""
    if not isinstance(config, ExperimentConfig):
        config = ExperimentConfig.from_yaml(config)
    return Experiment(config, run_dir or Path("runs") / config.name, judge).run()
