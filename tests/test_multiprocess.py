"""Two gloo processes on CPU train what one process trains at the doubled batch.

One `torchrun --standalone --nproc_per_node 2` launch of tests/multiprocess_worker.py trains SFT,
Surgery (same pool draws on every rank, and the default own draws), Vaccine and a whole
`run_stage`; the single-process references run here at per-device batch x 2.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_model, make_tokenizer
from multiprocess_worker import HARMFUL, METHODS, train
from safetensors.torch import load_file

from sinkguard.defenses import get_defense
from sinkguard.errors import SinkguardError
from sinkguard.train import make_config

WORKER = Path(__file__).with_name("multiprocess_worker.py")
PER_DEVICE = 2


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddp")
    tok = make_tokenizer()
    make_model(len(tok), seed=0).save_pretrained(out / "tiny")
    tok.save_pretrained(out / "tiny")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "src"), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER),
           str(out), str(PER_DEVICE), "sft", "surgery", "surgery_own_draws", "vaccine", f"stage={out / 'tiny'}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return out


def _close(model: torch.nn.Module, path: Path, atol: float = 1e-5) -> bool:
    saved = load_file(str(path))
    return all(torch.allclose(v, saved[k], atol=atol) for k, v in model.state_dict().items())


@pytest.mark.parametrize("method", ["sft", "surgery"])
def test_two_processes_at_b_equal_one_process_at_2b(two_processes, tmp_path, method):
    one = train(method, tmp_path, 2 * PER_DEVICE)
    init = make_model(len(make_tokenizer()), seed=0)
    assert not _close(init, two_processes / f"{method}.safetensors", atol=1e-3)  # it did train
    assert _close(one, two_processes / f"{method}.safetensors")
    if method == "surgery":
        history = json.loads((two_processes / "surgery.json").read_text())
        assert any(h.get("sink_loss", 0) > 0 for h in history)  # the penalty took part


def test_by_default_each_rank_draws_its_own_pool_texts(two_processes, tmp_path):
    one = train("surgery_own_draws", tmp_path, 2 * PER_DEVICE)
    assert not _close(one, two_processes / "surgery_own_draws.safetensors")


def test_vaccine_trains_under_two_processes(two_processes):
    init = make_model(len(make_tokenizer()), seed=0)
    weights = load_file(str(two_processes / "vaccine.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert not _close(init, two_processes / "vaccine.safetensors", atol=1e-3)


def test_only_the_main_process_writes_the_stage(two_processes):
    stage = two_processes / "stage"
    assert (stage / "model" / "config.json").is_file()
    assert json.loads((stage / "train_log.json").read_text())["processes"] == 2
    assert not (stage / ".model.tmp").exists() and not (stage / "checkpoints").exists()


def test_tvaccine_refuses_multiprocess_training(tmp_path, monkeypatch):
    from sinkguard.data import PadCollator, encode_example
    from sinkguard.distributed import check_trainer

    tok = make_tokenizer()
    _, stage, options = METHODS["tvaccine"]
    args = make_config("tvaccine", stage, tmp_path, max_steps=1, **options)
    trainer = get_defense("tvaccine", stage).trainer_cls(
        model=make_model(len(tok)), args=args, train_dataset=[], processing_class=tok,
        data_collator=PadCollator(tok.pad_token_id),
        harmful_set=[encode_example(tok, p, r, None, 64) for p, r in HARMFUL])
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(type(args), "world_size", property(lambda self: 2))
    with pytest.raises(SinkguardError, match="TVaccineTrainer cannot run under multi-process.*requires_grad"):
        check_trainer(trainer)


def test_accelerate_cpu_launch_of_one_process_is_refused(monkeypatch):
    from sinkguard.distributed import check_launch

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    with pytest.raises(SinkguardError, match="torchrun --nproc_per_node"):
        check_launch()
    monkeypatch.setenv("WORLD_SIZE", "2")
    check_launch()
