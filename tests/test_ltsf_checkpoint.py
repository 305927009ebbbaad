"""Official CycleNet checkpoint: loaded without pickle, forecasts equal to the official forward.

`data/cyclenet_weather_96_96_cycle144_linear.pth` is the official checkpoint
`checkpoints/weather_96_96_CycleNet_custom_ftM_sl96_pl96_cycle144_linear_seed2024/checkpoint.pth`
of ACAT-SCUT/CycleNet (Apache-2.0, 51 KB). Its look-back (96) is not a multiple of its cycle
(144), so the official phase convention matters. The reference forward below restates the
official `models/CycleNet.py` + `data_provider/data_loader.py` convention from their equations.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from ltsf import LTSFError, load_checkpoint
from ltsf.checkpoint import read_state_dict

CKPT = Path(__file__).parent / "data" / "cyclenet_weather_96_96_cycle144_linear.pth"


def official_forward(state: dict[str, torch.Tensor], x: np.ndarray, start: int) -> np.ndarray:
    """Official CycleNet/Linear for one window whose first input row is row `start`.

    The official loader passes `cycle_index[s_end]`, the cycle index of the first target row,
    i.e. `(start + seq_len) mod W`, and the model reads `Q[(i + k) mod W]` for the input and
    `Q[(i + seq_len + k) mod W]` for the output.
    """
    q = state["cycleQueue.data"].double().numpy()
    w_lin, b_lin = state["model.weight"].double().numpy(), state["model.bias"].double().numpy()
    seq_len, pred_len, cycle = w_lin.shape[1], w_lin.shape[0], q.shape[0]
    i = (start + seq_len) % cycle
    x = x.astype(np.float64)
    mean = x.mean(axis=0, keepdims=True)
    var = x.var(axis=0, ddof=1, keepdims=True) + 1e-5
    z = (x - mean) / np.sqrt(var)
    z = z - q[(i + np.arange(seq_len)) % cycle]
    y = (w_lin @ z) + b_lin[:, None]
    y = y + q[(i + seq_len + np.arange(pred_len)) % cycle]
    return y * np.sqrt(var) + mean


@pytest.mark.skipif(not CKPT.is_file(), reason="official checkpoint not in tests/data")
def test_official_cyclenet_checkpoint_matches_the_official_forward():
    state = read_state_dict(CKPT)
    fc = load_checkpoint(CKPT, model="CycleNet")
    cfg = fc.config
    assert (cfg.seq_len, cfg.pred_len, cfg.cycle, fc.enc_in, cfg.model_type) == (96, 96, 144, 21, "linear")
    assert cfg.seq_len % cfg.cycle != 0
    rng = np.random.default_rng(0)
    worst, naive_worst = 0.0, 0.0
    naive = load_checkpoint(CKPT, model="CycleNet")
    with torch.no_grad():  # the official Q used with ltsf's phase, without the rotation
        naive.model.cycleQueue.data.copy_(state["cycleQueue.data"])
    for start in (0, 1, 47, 100, 143, 5000, 36791):
        x = rng.standard_normal((96, 21)).cumsum(axis=0) * 0.1
        ref = official_forward(state, x, start)
        worst = max(worst, float(np.abs(fc.predict_window(x, start) - ref).max()))
        naive_worst = max(naive_worst, float(np.abs(naive.predict_window(x, start) - ref).max()))
    assert worst < 1e-5
    assert naive_worst > 1e-2  # the convention matters for this checkpoint


def test_checkpoint_errors_are_clear(tmp_path):
    with pytest.raises(LTSFError, match="not found"):
        load_checkpoint(tmp_path / "missing.pth")
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(LTSFError, match="not a readable state-dict checkpoint"):
        load_checkpoint(bad)
    torch.save({"valueEmbedding.0.weight": torch.zeros(8, 4)}, tmp_path / "seg.pth")
    with pytest.raises(LTSFError, match="official CycleNet checkpoint"):
        load_checkpoint(tmp_path / "seg.pth", model="CycleNet")
    if CKPT.is_file():
        with pytest.raises(LTSFError, match="contradicts the checkpoint"):
            load_checkpoint(CKPT, model="CycleNet", seq_len=336)
        with pytest.raises(LTSFError, match="expects x of shape"):
            load_checkpoint(CKPT).predict_window(np.zeros((96, 7)), 0)


def test_segrnn_checkpoint_round_trip_needs_seq_len(tmp_path):
    from ltsf import SegRNN

    torch.manual_seed(0)
    net = SegRNN(48, 24, 3, seg_len=12, d_model=16).eval()
    torch.save(net.state_dict(), tmp_path / "segrnn.pth")
    with pytest.raises(LTSFError, match="pass seq_len"):
        load_checkpoint(tmp_path / "segrnn.pth", model="SegRNN")
    fc = load_checkpoint(tmp_path / "segrnn.pth", model="SegRNN", seq_len=48)
    x = torch.randn(48, 3)
    with torch.no_grad():
        ref = net(x.unsqueeze(0))[0].numpy()
    assert np.abs(fc.predict_window(x, 7) - ref).max() < 1e-6
