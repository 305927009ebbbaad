"""Model shapes for every option, parameter counts, normalisation invariances, PMF factorisation."""

from __future__ import annotations

import itertools

import pytest
import torch

from ltsf import CycleNet, Linear, LTSFError, SegRNN, count_parameters

B, L, H, C = 3, 48, 24, 4


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run fastest single-threaded, especially on a shared, busy CPU."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.mark.parametrize("model_type, revin",
                         list(itertools.product(("linear", "mlp"), (True, False))))
def test_cyclenet_shapes(model_type, revin):
    m = CycleNet(L, H, C, cycle=7, model_type=model_type, d_model=16, use_revin=revin)
    y = m(torch.randn(B, L, C), torch.tensor([0, 3, 6]))
    assert y.shape == (B, H, C)


@pytest.mark.parametrize("rnn_type, dec_way, channel_id, revin",
                         list(itertools.product(("gru", "rnn", "lstm"), ("pmf", "rmf"),
                                                (True, False), (True, False))))
def test_segrnn_shapes(rnn_type, dec_way, channel_id, revin):
    m = SegRNN(L, H, C, seg_len=12, d_model=16, dropout=0.1, rnn_type=rnn_type, dec_way=dec_way,
               channel_id=channel_id, revin=revin)
    y = m(torch.randn(B, L, C))
    assert y.shape == (B, H, C)
    y.sum().backward()


def test_linear_shape():
    assert Linear(L, H)(torch.randn(B, L, C)).shape == (B, H, C)


def test_parameter_counts_match_the_architectures():
    assert count_parameters(CycleNet(96, 96, 7, 24, "linear")) == 96 * 96 + 96 + 24 * 7
    assert count_parameters(CycleNet(96, 720, 7, 24, "mlp", d_model=512)) == (
        96 * 512 + 512 + 512 * 720 + 720 + 24 * 7)
    d, w, m = 512, 24, 96 // 24
    gru = 3 * (2 * d * d + 2 * d)
    expected = (w * d + d) + gru + m * d // 2 + 7 * d // 2 + (d * w + w)
    assert count_parameters(SegRNN(96, 96, 7, seg_len=24, d_model=512)) == expected
    assert count_parameters(Linear(96, 96)) == 96 * 96 + 96


def test_state_dict_keys_follow_the_official_models():
    assert set(CycleNet(L, H, C, 7, "linear").state_dict()) == {
        "cycleQueue.data", "model.weight", "model.bias"}
    keys = set(SegRNN(L, H, C, seg_len=12, d_model=16).state_dict())
    assert {"valueEmbedding.0.weight", "rnn.weight_ih_l0", "rnn.weight_hh_l0", "pos_emb",
            "channel_emb", "predict.1.weight", "predict.1.bias"} <= keys
    assert set(Linear(L, H).state_dict()) == {"Linear.weight", "Linear.bias"}


def test_cyclenet_starts_with_zero_cycles_and_revin_is_affine_equivariant():
    torch.manual_seed(0)
    m = CycleNet(L, H, C, 7, "mlp", d_model=16, use_revin=True)
    assert torch.count_nonzero(m.cycleQueue.data) == 0
    x, p = torch.randn(B, L, C), torch.tensor([1, 2, 3])
    assert torch.allclose(m(3.0 * x + 5.0, p), 3.0 * m(x, p) + 5.0, atol=1e-4)


def test_cycle_queue_reads_cyclically():
    q = CycleNet(L, H, 1, 5, "linear").cycleQueue
    with torch.no_grad():
        q.data.copy_(torch.arange(5.0).view(5, 1))
    out = q(torch.tensor([3]), 8)[0, :, 0]
    assert out.tolist() == [3, 4, 0, 1, 2, 3, 4, 0]


def test_segrnn_last_value_normalisation_is_shift_equivariant():
    torch.manual_seed(0)
    m = SegRNN(L, H, C, seg_len=12, d_model=16, dropout=0.0).eval()
    x = torch.randn(B, L, C)
    assert torch.allclose(m(x + 7.0), m(x) + 7.0, atol=1e-5)


@pytest.mark.parametrize("rnn_type, channel_id",
                         list(itertools.product(("gru", "rnn", "lstm"), (True, False))))
def test_factorized_pmf_equals_the_repeated_rnn_call(rnn_type, channel_id):
    torch.manual_seed(0)
    m = SegRNN(L, H, C, seg_len=12, d_model=16, dropout=0.0, rnn_type=rnn_type,
               channel_id=channel_id)
    x = torch.randn(B, L, C)
    y_fast = m(x)
    g_fast = torch.autograd.grad(y_fast.square().sum(), m.rnn.weight_hh_l0)[0]
    m.factorized_pmf = False
    y_ref = m(x)
    g_ref = torch.autograd.grad(y_ref.square().sum(), m.rnn.weight_hh_l0)[0]
    assert torch.allclose(y_fast, y_ref, atol=1e-5)
    assert torch.allclose(g_fast, g_ref, atol=1e-4)


def test_segrnn_rejects_segments_that_do_not_divide():
    with pytest.raises(LTSFError, match="seg_len"):
        SegRNN(50, 24, 2, seg_len=12)


@pytest.mark.parametrize("model_type", ["linear", "mlp"])
def test_rcf_around_rlinear_or_rmlp_is_cyclenet(model_type):
    """CycleNet = instance norm + RCF around Linear/MLP: same weights give the same forecast."""
    from ltsf import MLP, RCF

    torch.manual_seed(0)
    net = CycleNet(L, H, C, 24, model_type=model_type, d_model=16)
    with torch.no_grad():
        net.cycleQueue.data.normal_()
    inner = Linear(L, H) if model_type == "linear" else MLP(L, H, d_model=16)
    wrapped = RCF(inner, L, H, C, 24, use_revin=True)
    prefix = "backbone.Linear." if model_type == "linear" else "backbone.MLP."
    wrapped.load_state_dict({"cycleQueue.data": net.cycleQueue.data,
                             **{prefix + k: v for k, v in net.model.state_dict().items()}})
    x, phase = torch.randn(B, L, C), torch.tensor([0, 5, 23])
    assert torch.allclose(net(x, phase), wrapped(x, phase), atol=1e-6)


def test_dlinear_matches_the_official_decomposition():
    """Trend = centred 25-step moving average with the first/last row repeated 12 times."""
    from ltsf import DLinear

    torch.manual_seed(0)
    net = DLinear(L, H, C)
    x = torch.randn(B, L, C)
    padded = torch.cat([x[:, :1].repeat(1, 12, 1), x, x[:, -1:].repeat(1, 12, 1)], dim=1)
    trend = torch.stack([padded[:, i:i + 25].mean(1) for i in range(L)], dim=1)
    seasonal = x - trend
    ref = (net.Linear_Seasonal(seasonal.transpose(1, 2)) + net.Linear_Trend(trend.transpose(1, 2))).transpose(1, 2)
    assert torch.allclose(net(x), ref, atol=1e-5)
    ind = DLinear(L, H, C, individual=True)
    assert count_parameters(ind) == C * count_parameters(net) and ind(x).shape == (B, H, C)
