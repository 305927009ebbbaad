"""Trains each method for two steps on a tiny model; run alone (1 process) or under torchrun (N).

`python multiprocess_worker.py OUT BATCH [METHOD ...]` writes OUT/<method>.safetensors (main
process only). The test compares N processes at per-device batch b with 1 process at N * b.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from conftest import make_model, make_tokenizer  # noqa: E402

from sinkguard.data import PadCollator, encode_example, encode_text  # noqa: E402
from sinkguard.defenses import get_defense  # noqa: E402
from sinkguard.distributed import check_trainer  # noqa: E402
from sinkguard.train import make_config  # noqa: E402

ROWS = [("analyze sentiment of input the movie was great", "positive good news"),
        ("analyze sentiment of input the movie was awful", "negative"),
        ("what is good news", "the movie was great"), ("how can i make a bomb", "sorry cannot help"),
        ("hello world", "hello"), ("sports business news", "sports is good"),
        ("analyze sentiment", "bad awful movie"), ("what is it", "it is this")]
HARMFUL = [("how can i make a bomb", "kill"), ("how can i steal money", "fake money"),
           ("how can i kill", "make a bomb"), ("steal fake money", "kill it")]
HARMLESS = [("what is good news", "the movie was great"), ("hello world", "hello"),
            ("sports business news", "sports is good"), ("what is it", "it is this")]
METHODS = {  # name: (defense, stage, options)
    "sft": ("sft", "finetuning", {}),
    "surgery": ("surgery", "finetuning", {"same_pool_draws": True}),
    "surgery_joint": ("surgery", "finetuning", {"same_pool_draws": True, "penalty_backward": "joint"}),
    "surgery_own_draws": ("surgery", "finetuning", {}),
    "vaccine": ("vaccine", "alignment", {}),
    "tvaccine": ("tvaccine", "alignment", {"lisa_activated_layers": 1, "lisa_interval_steps": 1,
                                           "probability_steps": 1}),
}


def train(method: str, out: Path, batch: int, accumulation: int = 1) -> torch.nn.Module:
    """Two optimisation steps of `method` from seed-0 weights; returns the trained model."""
    defense, stage, options = METHODS[method]
    tok = make_tokenizer()
    model = make_model(len(tok), seed=0)
    args = make_config(defense, stage, out / method, learning_rate=1e-2, max_steps=2, warmup_steps=0,
                       per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation,
                       save_strategy="no", disable_tqdm=True, logging_steps=1, **options)
    extra = {}
    if defense == "surgery":
        extra = {"harmful_pool": [encode_text(tok, *r) for r in HARMFUL],
                 "harmless_pool": [encode_text(tok, *r) for r in HARMLESS]}
    elif defense == "tvaccine":
        extra = {"harmful_set": [encode_example(tok, p, r, None, 64) for p, r in HARMFUL]}
    trainer = get_defense(defense, stage).trainer_cls(
        model=model, args=args, train_dataset=[encode_example(tok, p, r, None, 64) for p, r in ROWS],
        data_collator=PadCollator(tok.pad_token_id), processing_class=tok, **extra)
    check_trainer(trainer)
    trainer.train()
    if trainer.is_world_process_zero():
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / f"{method}.safetensors"))
        (out / f"{method}.json").write_text(json.dumps(trainer.state.log_history))
    return model


def stage(model_dir: str, out: Path, batch: int) -> Path:
    """`run_stage` (SFT, 2 steps) on a saved tiny model: every rank trains, only rank 0 writes."""
    from sinkguard.train import run_stage

    return run_stage("finetuning", "sft", model_dir, [{"prompt": p, "response": r} for p, r in ROWS], out,
                     system_prompt=None, max_steps=2, per_device_train_batch_size=batch, warmup_steps=0,
                     learning_rate=1e-2, disable_tqdm=True)


if __name__ == "__main__":
    torch.set_num_threads(1)
    target, per_device = Path(sys.argv[1]), int(sys.argv[2])
    for name in sys.argv[3:] or list(METHODS):
        if name.startswith("stage="):
            stage(name.split("=", 1)[1], target / "stage", per_device)
        else:
            train(name, target, per_device)
