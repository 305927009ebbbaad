"""Slow real-data check: CycleNet/Linear on ETTh1 reproduces the official seed-2024 result."""

from __future__ import annotations

import pytest
import torch

from ltsf import RunConfig, run
from ltsf.data import default_data_root

pytestmark = pytest.mark.slow


@pytest.mark.skipif(not (default_data_root() / "ETTh1.csv").is_file(),
                    reason="ETTh1.csv not in the data root (set LTSF_DATA)")
def test_cyclenet_linear_etth1_matches_the_official_seed_2024_run(tmp_path):
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = RunConfig(model="CycleNet", data="ETTh1", seq_len=96, pred_len=96, cycle=24,
                        model_type="linear", train_epochs=30, patience=5, batch_size=256,
                        learning_rate=0.01, random_seed=2024, checkpoints=str(tmp_path))
        result = run(cfg, progress=False)
    finally:
        torch.set_num_threads(previous)
    # ACAT-SCUT/CycleNet result.txt, ETTh1_96_96 linear seed 2024: mse 0.37735623, mae 0.39069337
    assert result["mse"] == pytest.approx(0.37735623, abs=2e-5)
    assert result["mae"] == pytest.approx(0.39069337, abs=2e-5)
    assert result["params"] == 9480
