"""Run a whole study from one YAML config: align -> fine-tune grid -> post-fine-tune -> evaluate -> results.json.

Every stage lives in `RUN_DIR/stages/<kind>-<hash>/`, the hash covering the stage's settings and
everything upstream, so a grid reuses one aligned model and an interrupted study resumes where it
stopped (finished stages are skipped, unfinished ones resume from their checkpoints). `plan()`
lists the stages without loading anything; `sinkguard run --dry-run` prints it. `run` executes
them cell by cell (each model evaluated right after it is trained) and trains only models whose
evaluations are not already answered, so a study whose small result files were kept (committed
without weights, see docs/results/benchmark_cpu.md) resumes on a fresh machine.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .config import (
    LOCAL_JUDGE,
    AlignmentConfig,
    EvaluationConfig,
    FinetuningConfig,
    PostFinetuningConfig,
    check_run_name,
    coerce,
    from_dict,
)
from .errors import SinkguardError
from .io import write_json, write_text

log = logging.getLogger(__name__)

SECTIONS = {"alignment": AlignmentConfig, "finetuning": FinetuningConfig,
            "post_finetuning": PostFinetuningConfig, "evaluation": EvaluationConfig}
TOP_KEYS = ("name", "model", "seeds", "data_root", "hub_datasets", *SECTIONS)


def _cell(record: dict) -> tuple:
    """What identifies a results row: the model's stages, task, poison ratio and seed."""
    return tuple(record.get(k) for k in ("alignment", "defense", "post", "task", "poison_ratio", "seed"))


@dataclass
class ExperimentConfig:
    """A study: the model, seeds, and the typed settings of each stage (see configs/*.yaml).

    Sections may be given as mappings (YAML); they are validated into their dataclasses at once.
    `alignment: null` skips alignment (the model is fine-tuned as given). `hub_datasets`: hub
    datasets (`data.sources.HUB_IDS`, e.g. openai/gsm8k) read from the hub instead of the data root.
    """

    name: str = "experiment"
    model: str = "smollm2-135m-instruct"
    seeds: list[int] = field(default_factory=lambda: [43])
    data_root: str | None = None
    hub_datasets: list[str] = field(default_factory=list)
    alignment: AlignmentConfig | None = field(default_factory=AlignmentConfig)
    finetuning: FinetuningConfig = field(default_factory=FinetuningConfig)
    post_finetuning: PostFinetuningConfig = field(default_factory=PostFinetuningConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)

    def __post_init__(self) -> None:
        check_run_name(self.name)
        self.model = coerce(self.model, str, "model")
        self.seeds = coerce(self.seeds, list[int], "seeds")
        self.data_root = coerce(self.data_root, str | None, "data_root")
        self.hub_datasets = coerce(self.hub_datasets, list[str], "hub_datasets")
        from .data.sources import check_hub_datasets

        check_hub_datasets(self.hub_datasets)
        if not self.seeds:
            raise SinkguardError("seeds must list at least one seed, e.g. seeds: [43]")
        for name, cls in SECTIONS.items():
            value = getattr(self, name)
            if value is None and name == "alignment":
                continue
            if not isinstance(value, cls):
                setattr(self, name, from_dict(cls, value, name))

    @classmethod
    def from_yaml(cls, path: str | os.PathLike, resolve_model: bool = False) -> ExperimentConfig:
        """Read and validate a config file; unknown keys and bad values are one clear error.

        `resolve_model` also checks that the model can be loaded (in milliseconds, before the slower
        stage validation); a dry run leaves it off, so it works offline for any hub model.
        """
        path = Path(path)
        if not path.is_file():
            raise SinkguardError(f"config file {path} not found")
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise SinkguardError(f"{path} is not UTF-8 text") from None
        except yaml.YAMLError as exc:
            raise SinkguardError(f"{path} is not valid YAML: {' '.join(str(exc).split())}") from None
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise SinkguardError(f"{path}: expected a mapping of settings (name, model, ...), got {raw!r}")
        unknown = sorted(set(map(str, raw)) - set(TOP_KEYS))
        if unknown:
            raise SinkguardError(f"{path}: unknown key(s) {', '.join(unknown)}; known: {', '.join(TOP_KEYS)}")
        try:
            if resolve_model:
                from .models import check_model

                check_model(coerce(raw.get("model", cls.model), str, "model"))
            return cls(**raw)
        except SinkguardError as exc:
            raise SinkguardError(f"{path}: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        """The whole config as plain data, defaults filled in (written to RUN_DIR/config.yaml)."""
        return dataclasses.asdict(self)


def stage_hash(*parts: Any) -> str:
    """Short stable hash of JSON-able settings."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:10]


def _stage_settings(stage, defense: str, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """A training stage's settings for one defense: its keys (less lists it loops over) and that defense's options.

    `keep_checkpoints` counts only when set (it keeps checkpoints, the model is the same), `dtype`
    only when not float32 and `template` only when not chat, so stages keep the hashes they had
    before these keys existed.
    """
    settings = {k: v for k, v in dataclasses.asdict(stage).items()
                if k not in ("defenses", "options", *skip) and not (k == "keep_checkpoints" and not v)
                and not (k == "dtype" and v == "float32") and not (k == "template" and v == "chat")}
    return {**settings, "defense": defense, "options": stage.defense_options(defense)}


def eval_hash(model_hash: str, task: str, evaluation: EvaluationConfig) -> str:
    """Hash of an evaluation folder: the model, the task and the settings the answers depend on
    (verdict-only settings such as `correction_source` left out: they re-score cached answers)."""
    return stage_hash("evaluation", model_hash, task, evaluation.generation_settings())


class Experiment:
    """Runs the flow of docs/architecture.md for one config into `run_dir`."""

    def __init__(self, config: ExperimentConfig, run_dir: str | os.PathLike, judge=None,
                 overwrite: bool = False) -> None:
        self.config = config
        self.run_dir = Path(run_dir)
        self.judge = judge
        self.overwrite = overwrite

    # ------------------------------------------------------------------ plan
    def plan(self, seeds: list[int] | None = None) -> list[dict[str, Any]]:
        """Every stage the study runs, in order (training first, then evaluation), as plain dicts;
        only those of `seeds` when given (a subset of the config's: a long study run a seed at a time).

        Keys: `stage`, `folder` (under the run dir), `defense`, `seed`, `from` (the folder or model
        it starts from), `steps` (optimizer steps, before rows too long are dropped); fine-tuning
        adds `task`, `poison_ratio`; evaluation adds `record` (the results row it fills).
        Nothing is loaded: the plan is what `--dry-run` prints and what `run` executes.
        """
        from .train import planned_steps

        if seeds is not None and not set(seeds) <= set(self.config.seeds):
            raise SinkguardError(f"seeds {sorted(set(seeds) - set(self.config.seeds))} are not in the config's "
                                 f"seeds {self.config.seeds}: pick from those (the stage folders depend on the seed)")

        cfg = self.config
        a, f, post, e = cfg.alignment, cfg.finetuning, cfg.post_finetuning, cfg.evaluation
        train: list[dict] = []
        evals: list[dict] = []

        def evaluation(source: dict, label: str, task: str, p: float | None, seed: int, aligner: str,
                       post_name: str = "none") -> None:
            h = eval_hash(source["hash"], task, e)
            evals.append({"stage": "evaluation", "folder": f"stages/eval-{h}", "from": source["folder"],
                          "hash": h, "task": task, "seed": seed, "model_hash": source["hash"],
                          "record": {"alignment": aligner, "defense": label, "post": post_name, "task": task,
                                     "poison_ratio": p, "seed": seed}})

        # Hub data changes every stage's inputs; without it the hashes are the ones from before the key.
        origin = [cfg.model, sorted(cfg.hub_datasets)] if cfg.hub_datasets else cfg.model
        base = {"folder": cfg.model, "hash": stage_hash(origin)}
        for seed in cfg.seeds:
            aligners = a.defenses if a is not None else ["none"]
            for aligner in aligners:
                aligned = base
                if a is not None:
                    settings = _stage_settings(a, aligner)
                    h = stage_hash("alignment", origin, settings, seed)
                    aligned = {"stage": "alignment", "folder": f"stages/align-{aligner}-{h}", "from": cfg.model,
                               "hash": h, "defense": aligner, "seed": seed, "settings": settings,
                               "steps": planned_steps(a.samples, a.batch_size, a.grad_accum, a.epochs, a.max_steps)}
                    train.append(aligned)
                for task in f.tasks:
                    if e.evaluate_base and a is not None and aligner == aligners[0] and seed == cfg.seeds[0]:
                        evaluation(base, "base", task, None, seed, "none")
                    if e.evaluate_aligned:
                        evaluation(aligned, "aligned", task, None, seed, aligner)
                    for defense in f.defenses:
                        settings = _stage_settings(f, defense, skip=("tasks", "poison_ratios"))
                        for p in f.poison_ratios:
                            h = stage_hash("finetuning", aligned["hash"], defense, task, p, seed, settings)
                            tuned = {"stage": "finetuning", "folder": f"stages/ft-{defense}-{task}-p{p}-s{seed}-{h}",
                                     "from": aligned["folder"], "hash": h, "defense": defense, "task": task,
                                     "poison_ratio": p, "seed": seed, "settings": settings,
                                     "steps": planned_steps(f.samples, f.batch_size, f.grad_accum, f.epochs,
                                                            f.max_steps)}
                            train.append(tuned)
                            evaluation(tuned, defense, task, p, seed, aligner)
                            for repair in post.defenses if post.after is None or defense in post.after else []:
                                options = post.defense_options(repair)
                                ph = stage_hash("post_finetuning", h, repair, options)
                                repaired = {"stage": "post_finetuning", "folder": f"stages/post-{repair}-{ph}",
                                            "from": tuned["folder"], "hash": ph, "defense": repair, "seed": seed,
                                            "settings": {"defense": repair, "options": options}, "steps": None}
                                train.append(repaired)
                                evaluation(repaired, defense, task, p, seed, aligner, repair)
        jobs = train + evals
        return jobs if seeds is None else [job for job in jobs if job["seed"] in seeds]

    # ------------------------------------------------------------------ stages
    def align(self, job: dict) -> str:
        """Run an alignment job of the plan; the aligned model's path."""
        from .data import alignment_dataset
        from .train import run_stage, stage_arguments

        cfg, a = self.config, self.config.alignment
        rows = alignment_dataset(a.samples, cfg.data_root, keep_input=a.template == "alpaca")
        lora = dataclasses.asdict(a.lora) if a.lora else None
        path = run_stage("alignment", job["defense"], cfg.model, rows, self.run_dir / job["folder"], lora=lora,
                         system_prompt=a.system_prompt or None, template=a.template, data_root=cfg.data_root,
                         dtype=a.dtype, settings={"seed": job["seed"], **job["settings"]}, overwrite=self.overwrite,
                         **stage_arguments(a, job["seed"]), **job["settings"]["options"])
        return str(path)

    def finetune(self, job: dict, base: str) -> str:
        """Run a fine-tuning job of the plan from model `base`; the fine-tuned model's path."""
        from .data import poisoned_dataset
        from .train import run_stage, stage_arguments

        cfg, f = self.config, self.config.finetuning
        rows = poisoned_dataset(job["task"], f.samples, job["poison_ratio"], f.attack, job["seed"], cfg.data_root,
                                keep_input=f.template == "alpaca")
        lora = dataclasses.asdict(f.lora) if f.lora else None
        path = run_stage("finetuning", job["defense"], base, rows, self.run_dir / job["folder"], lora=lora,
                         system_prompt=f.system_prompt or None, template=f.template, data_root=cfg.data_root,
                         dtype=f.dtype, settings={"task": job["task"], "poison_ratio": job["poison_ratio"],
                                                  "seed": job["seed"], **job["settings"]},
                         overwrite=self.overwrite, allow_drop=f.allow_drop, keep_checkpoints=f.keep_checkpoints,
                         **stage_arguments(f, job["seed"]), **job["settings"]["options"])
        return str(path)

    def repair(self, job: dict, tuned: str) -> str:
        """Run a post-fine-tuning job of the plan on fine-tuned model `tuned` (its calibration rows in the
        fine-tuning stage's template); the repaired model's path."""
        from .train import run_post_stage

        adapter = Path(tuned).parent / "adapter"
        path = run_post_stage(job["defense"], tuned, self.run_dir / job["folder"],
                              options=job["settings"]["options"], data_root=self.config.data_root,
                              adapter_dir=adapter if adapter.is_dir() else None, overwrite=self.overwrite,
                              template=self.config.finetuning.template)
        return str(path)

    def evaluate(self, model_path: str, model_hash: str, task: str) -> dict:
        """HS (+ refusal rate) on the configured prompt sets, over-refusal, FA on `task`, sink divergence.

        Answers are cached per model and generation settings, verdicts per judge identity
        (`sinkguard.evaluate.study`): a new judge re-scores without generating again.
        """
        from .evaluate.study import evaluate_model

        e = self.config.evaluation
        out = self.run_dir / "stages" / f"eval-{eval_hash(model_hash, task, e)}"
        exclude = []
        if task == "alpaca" and e.benign_limit:  # its train rows may be fine-tuned on
            from .data import load_source

            exclude = [r["prompt"] for r in load_source("alpaca", "train", self.config.data_root)]
            log.warning("task alpaca: over-refusal measured on the %d held-out AlpacaEval prompts only",
                        len(load_source("alpaca", "test", self.config.data_root)))
        return evaluate_model(model_path, out, task, e, self.load_judge(), self.config.data_root, exclude)

    def load_judge(self):
        """The study's judge (the evaluation's `judge`: the local one, trained once if none is cached, a
        judge folder, or a hub moderation model), loaded on first use."""
        if self.judge is None:
            from .data.sources import hub_sources
            from .evaluate.judge import Judge, load_judge
            from .evaluate.judge_hub import HUB_JUDGES

            e = self.config.evaluation
            if e.judge in HUB_JUDGES:
                self.judge = Judge.from_hub(e.judge)
            else:
                with hub_sources(()):  # a local judge trains on the data root's labelled splits
                    self.judge = load_judge(auto_train=True, path=None if e.judge == LOCAL_JUDGE else e.judge,
                                            root=self.config.data_root)
        return self.judge

    def schedule(self, jobs: list[dict]) -> list[dict]:
        """The jobs of the plan in the order `run` executes them: evaluations of the given model first,
        then each training stage followed at once by the evaluations of its model, so a study's results
        appear cell by cell; a training stage is left out when every evaluation downstream of it is
        answered without its model (`evaluate.study.answered`), so a study whose results were kept
        (e.g. committed) finishes without its weights."""
        from .evaluate.study import answered

        train = {job["folder"]: job for job in jobs if job["stage"] != "evaluation"}
        evals = [job for job in jobs if job["stage"] == "evaluation"]
        needed: set[str] = set()
        for job in evals:
            if not answered(self.run_dir / job["folder"], self.load_judge):
                folder = job["from"]
                while folder in train and folder not in needed:
                    needed.add(folder)
                    folder = train[folder]["from"]
        order = [job for job in evals if job["from"] not in train]
        for folder, job in train.items():
            if folder in needed:
                order.append(job)
            order += [e for e in evals if e["from"] == folder]
        return order

    # ------------------------------------------------------------------ flow
    def run(self, seeds: list[int] | None = None) -> dict:
        """Run (or resume) every stage of the plan, or only those of `seeds` (a subset of the config's,
        so a long study can be run a seed at a time into the same folder); write and return
        `results.json` (every finished cell of the config: those of other seeds are kept)."""
        from .data.sources import hub_sources

        with hub_sources(self.config.hub_datasets):
            return self._run(seeds)

    def _run(self, seeds: list[int] | None = None) -> dict:
        cfg = self.config
        jobs = self.plan(seeds)
        whole = jobs if seeds is None else self.plan()
        earlier = self._earlier_records(whole, seeds)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        write_text(self.run_dir / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        timings: dict[str, float] = {}
        # folder (or model name) -> model path; a stage left out by `schedule` keeps its planned path
        models: dict[str, str] = {cfg.model: cfg.model}
        models |= {job["folder"]: str(self.run_dir / job["folder"] / "model") for job in jobs
                   if job["stage"] != "evaluation"}
        for job in self.schedule(jobs):
            t0 = time.time()
            if job["stage"] == "alignment":
                models[job["folder"]] = self.align(job)
            elif job["stage"] == "finetuning":
                models[job["folder"]] = self.finetune(job, models[job["from"]])
            elif job["stage"] == "post_finetuning":
                models[job["folder"]] = self.repair(job, models[job["from"]])
            else:
                r = self.evaluate(models[job["from"]], job["model_hash"], job["task"])
                job["result"] = self._record(job["record"], r)
            timings[job["stage"]] = round(timings.get(job["stage"], 0) + time.time() - t0, 1)
            if job["stage"] == "evaluation":  # cell by cell: a stopped run still has its results so far
                self._write_results(whole, earlier + [j["result"] for j in jobs if "result" in j], timings)
        return self._write_results(whole, earlier + [j["result"] for j in jobs if j["stage"] == "evaluation"], timings)

    def _earlier_records(self, whole: list[dict], seeds: list[int] | None) -> list[dict]:
        """The results.json records of the seeds not run now whose evaluation folder is still answered for
        these settings: kept, so a study run a seed at a time reads whole (none for a run of every seed)."""
        from .report import load_results

        if seeds is None or not (self.run_dir / "results.json").is_file():
            return []
        try:
            previous = load_results(self.run_dir)["records"]
        except SinkguardError as err:
            log.warning("%s; the records of seeds other than %s are not kept", err, seeds)
            return []
        answered = {_cell(job["record"]) for job in whole if job["stage"] == "evaluation"
                    and job["seed"] not in seeds and (self.run_dir / job["folder"] / "eval.json").is_file()}
        return [r for r in previous if _cell(r) in answered]

    def _write_results(self, whole: list[dict], records: list[dict], timings: dict) -> dict:
        """`results.json`: the records in the plan's order; `complete` is false while cells of the config
        (`whole`, its full plan) are missing."""
        cfg = self.config
        cells = {_cell(r): r for r in records}
        wanted = [_cell(job["record"]) for job in whole if job["stage"] == "evaluation"]
        kept = [cells[c] for c in wanted if c in cells]
        results = {"name": cfg.name, "model": cfg.model, "records": kept, "stage_wall_s": timings,
                   "complete": len(kept) == len(wanted)}
        write_json(self.run_dir / "results.json", results)
        return results

    @staticmethod
    def _record(record: dict, r: dict) -> dict:
        from .report import record_fields

        return {**record, **record_fields(r)}


def run_experiment(config: str | os.PathLike | ExperimentConfig, run_dir: str | os.PathLike | None = None,
                   judge=None, overwrite: bool = False) -> dict:
    """Load a config (path or object) and run it into `run_dir` (default `runs/<name>`)."""
    if not isinstance(config, ExperimentConfig):
        config = ExperimentConfig.from_yaml(config)
    return Experiment(config, run_dir or Path("runs") / config.name, judge, overwrite).run()
