"""Antidote: one-shot pruning of harmful weights after fine-tuning (Huang et al., 2024; official
git-disl/Antidote `utils.py` `prune_wanda_outlier`, applied in `train.py`).

A harmful set (disjoint from the attack rows) runs once through the fine-tuned model; each targeted
Linear gets the Wanda score |W_ij| * ||X_j||_2 (X_j: its j-th input column over all tokens), and in
every row the weights with the largest scores are set to zero: the fine-tuning LoRA's lora_A /
lora_B when the fine-tuning was LoRA, the base q, k, v weights otherwise (docs/methods/antidote.md).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..data import DEFAULT_SYSTEM_PROMPT, PadCollator, defense_harmful_set, encode_example
from ..data.formatting import drop_system_prompts
from ..errors import SinkguardError
from ..io import write_json
from . import Defense, register

log = logging.getLogger(__name__)

FULL_TARGETS = ("q_proj", "k_proj", "v_proj")  # official full-fine-tuning branch


@dataclass
class AntidoteConfig:
    """Antidote's options (defaults: official `script/finetune/antidote_poison_ratio.sh`)."""

    dense_ratio: float = field(default=0.1, metadata={"help": "share of each row pruned (official 0.1; 0.05 GSM8K)"})
    samples: int | None = field(
        default=None, metadata={"help": "harmful calibration rows, disjoint from the attack rows (official "
                                "2,000; None: all that the data allows, 426 BeaverTails train rows here)"}
    )
    branch: str = field(
        default="auto", metadata={"help": "'lora': prune the fine-tuning adapter's lora_A/lora_B; 'full': prune "
                                  "base weights; 'auto': lora when an adapter is given or found, else full"}
    )
    target_modules: list[str] | None = field(
        default=None, metadata={"help": "module name suffixes to prune (default, official: every LoRA module of "
                                "the adapter; q_proj, k_proj, v_proj for a full fine-tune)"}
    )
    prune_count: str = field(
        default="official", metadata={"help": "weights pruned per row of length n: 'official' n - int(n * (1 - "
                                      "dense_ratio)); 'floor' int(dense_ratio * n)"}
    )
    system_prompt: str | None = field(
        default=DEFAULT_SYSTEM_PROMPT, metadata={"help": "system prompt of the harmful rows (as the task rows; "
                                                 "template alpaca: none)"}
    )
    max_length: int = field(default=2048, metadata={"help": "token limit per harmful row (official 2048)"})
    batch_size: int = field(
        default=8, metadata={"help": "rows per forward (official 1; padding tokens are left out of the "
                             "statistic, so the scores are the same)"}
    )
    device: str | None = field(default=None, metadata={"help": "device (default: cuda if available, else cpu)"})

    def __post_init__(self) -> None:
        if not 0 < self.dense_ratio <= 1:
            raise SinkguardError(f"dense_ratio must be in (0, 1], got {self.dense_ratio}")
        if self.branch not in ("auto", "lora", "full"):
            raise SinkguardError(f"branch must be 'auto', 'lora' or 'full', not {self.branch!r}")
        if self.prune_count not in ("official", "floor"):
            raise SinkguardError(f"prune_count must be 'official' or 'floor', not {self.prune_count!r}")
        if self.samples is not None and self.samples < 1:
            raise SinkguardError(f"samples must be >= 1, got {self.samples}")
        if self.batch_size < 1:
            raise SinkguardError(f"batch_size must be >= 1, got {self.batch_size}")
        if isinstance(self.target_modules, str):
            self.target_modules = [m.strip() for m in self.target_modules.split(",") if m.strip()]


def pruned_per_row(row_length: int, dense_ratio: float, rule: str = "official") -> int:
    """Weights zeroed in a row: official keeps the int(n * (1 - dense_ratio)) lowest scores."""
    if rule == "floor":
        return int(dense_ratio * row_length)
    return row_length - int(row_length * (1 - dense_ratio))


def target_linears(model: nn.Module, lora: bool, suffixes: list[str] | None) -> dict[str, nn.Linear]:
    """{name: Linear} to prune: LoRA's lora_A/lora_B modules, or base Linears named by `suffixes`."""
    out = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        if lora:
            parts = name.split(".")
            if len(parts) < 3 or parts[-2] not in ("lora_A", "lora_B"):
                continue
            owner = parts[-3]  # ...self_attn.q_proj.lora_A.default
            if suffixes is None or owner in suffixes:
                out[name] = module
        elif "lora_" not in name and any(name.split(".")[-1] == s for s in (suffixes or FULL_TARGETS)):
            out[name] = module
    if not out:
        what = "LoRA modules" if lora else f"Linear modules named {', '.join(suffixes or FULL_TARGETS)}"
        raise SinkguardError(f"Antidote found no {what} to prune; check target_modules")
    return out


@torch.no_grad()
def input_sq_norms(model: nn.Module, modules: dict[str, nn.Linear], batches) -> tuple[dict[str, torch.Tensor], int]:
    """Per module, the official `scaler_row`: sum over rows and real tokens of X_j^2, divided by the rows."""
    sums = {n: torch.zeros(m.in_features, dtype=torch.float32, device=m.weight.device) for n, m in modules.items()}
    mask: list[torch.Tensor] = []

    def make_hook(name: str):
        def hook(module, args):
            x = args[0].float()
            keep = mask[0].to(x.device, torch.float32).unsqueeze(-1)
            sums[name] += (x.pow(2) * keep).reshape(-1, x.shape[-1]).sum(0)
        return hook

    handles = [m.register_forward_pre_hook(make_hook(n)) for n, m in modules.items()]
    rows = 0
    try:
        for batch in batches:
            mask[:] = [batch["attention_mask"]]
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            rows += batch["input_ids"].shape[0]
    finally:
        for h in handles:
            h.remove()
    if rows == 0:
        raise SinkguardError("Antidote needs at least one harmful calibration row")
    return {n: s / rows for n, s in sums.items()}, rows


def wanda_mask(weight: torch.Tensor, sq_norm: torch.Tensor, dense_ratio: float, rule: str = "official") -> torch.Tensor:
    """Bool mask of the weights to zero: per row, the largest |W_ij| * sqrt(scaler_j), ties as the
    official stable ascending sort (its last `pruned_per_row` positions)."""
    score = weight.detach().float().abs() * torch.sqrt(sq_norm.float()).reshape(1, -1)
    k = pruned_per_row(score.shape[1], dense_ratio, rule)
    mask = torch.zeros_like(score, dtype=torch.bool)
    if k > 0:
        order = torch.sort(score, dim=-1, stable=True).indices
        mask.scatter_(1, order[:, score.shape[1] - k:], True)
    return mask


def _find_adapter(model_dir: Path, adapter_dir: str | os.PathLike | None, branch: str) -> Path | None:
    if branch == "full":
        return None
    if adapter_dir is not None:
        path = Path(adapter_dir)
    elif (model_dir / "adapter_config.json").is_file():
        path = model_dir
    else:
        path = model_dir.parent / "adapter"
    if (path / "adapter_config.json").is_file():
        return path
    if branch == "lora" or adapter_dir is not None:
        raise SinkguardError(f"no LoRA adapter at {path} (adapter_config.json missing); pass the fine-tuning "
                             "stage's adapter folder, or use branch=full")
    return None


def _load(model_dir: Path, adapter: Path | None, device: str):
    """(model to prune, tokenizer): the base plus the unmerged fine-tuning adapter, or the model itself."""
    from ..models import load_model, load_tokenizer

    if adapter is None:
        return load_model(model_dir, device=device), load_tokenizer(model_dir)
    from peft import PeftModel

    base = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    if not base:
        raise SinkguardError(f"{adapter}/adapter_config.json names no base model")
    model = PeftModel.from_pretrained(load_model(base, device=device), str(adapter))
    tok_dir = model_dir if (model_dir / "tokenizer_config.json").is_file() else base
    return model, load_tokenizer(tok_dir)


def apply(model_dir: str | os.PathLike, out_dir: str | os.PathLike, config: AntidoteConfig | None = None, *,
          data_root: str | os.PathLike | None = None, adapter_dir: str | os.PathLike | None = None,
          template: str = "chat") -> Path:
    """Prune `model_dir` (or its fine-tuning adapter) into `out_dir/model`; log to `out_dir/repair_log.json`.
    The calibration rows are in `template`, the format the model was fine-tuned with.

    A finished repair (both present) is reused.
    """
    config = config or AntidoteConfig()
    drop_system_prompts(config, template, lambda name: f"antidote option {name}")
    model_dir, out = Path(model_dir), Path(out_dir)
    final = out / "model"
    if (final / "config.json").is_file() and (out / "repair_log.json").is_file():
        log.info("antidote: already repaired, reusing %s", final)
        return final
    start = time.time()
    device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
    adapter = _find_adapter(model_dir, adapter_dir, config.branch)
    model, tokenizer = _load(model_dir, adapter, device)
    model.eval()
    modules = target_linears(model, adapter is not None, config.target_modules)
    rows = defense_harmful_set(config.samples, data_root)
    encoded = [encode_example(tokenizer, r["prompt"], r["response"], config.system_prompt, config.max_length,
                              template) for r in rows]
    pad = PadCollator(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
    batches = (
        {k: v.to(device) for k, v in pad(encoded[i: i + config.batch_size]).items()}
        for i in range(0, len(encoded), config.batch_size)
    )
    batches = tqdm(batches, total=-(-len(encoded) // config.batch_size), desc="antidote calibration")
    sq_norms, n_rows = input_sq_norms(model, modules, batches)
    pruned = {}
    with torch.no_grad():
        for name, module in modules.items():
            mask = wanda_mask(module.weight, sq_norms[name], config.dense_ratio, config.prune_count)
            module.weight[mask] = 0
            pruned[name] = int(mask.sum())
    tmp = out / ".model.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    if adapter is not None:
        adapter_tmp = out / ".adapter.tmp"
        shutil.rmtree(adapter_tmp, ignore_errors=True)
        model.save_pretrained(adapter_tmp)
        model = model.merge_and_unload()
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    if adapter is not None:
        shutil.rmtree(out / "adapter", ignore_errors=True)
        os.replace(adapter_tmp, out / "adapter")
    weights = sum(m.weight.numel() for m in modules.values())
    write_json(out / "repair_log.json", {
        "defense": "antidote", "model": str(model_dir), "adapter": str(adapter) if adapter else None,
        "branch": "lora" if adapter is not None else "full", "calibration_rows": n_rows,
        "pruned": pruned, "pruned_total": sum(pruned.values()), "weights_in_targets": weights,
        "config": asdict(config), "template": template, "wall_s": round(time.time() - start, 1),
    })
    log.info("antidote: pruned %d of %d weights in %d modules -> %s", sum(pruned.values()), weights,
             len(pruned), final)
    return final


register(Defense("antidote", "post_finetuning", AntidoteConfig,
                 description="one-shot Wanda-score pruning of the weights most important to harmful outputs",
                 paper="Huang et al. 2024, Antidote: Post-fine-tuning Safety Alignment for Large Language Models "
                       "against Harmful Fine-tuning",
                 official_code="git-disl/Antidote", apply=apply))
