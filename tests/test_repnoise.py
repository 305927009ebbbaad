"""RepNoise on tiny random Llama models: each loss term against a direct transcription of the
official `rep_noise_loss` (full logits, no checkpointing), the chunked/checkpointed gradients, the
trainer's step, the `answer` mask."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import make_model
from test_booster import HARMFUL, ROWS, batch_of, make_trainer

from sinkguard.defenses.repnoise import masked_ce, mmd, repnoise_loss, repnoise_terms
from sinkguard.errors import SinkguardError
from sinkguard.train import make_config


def direct_mmd(x, y, kernel_mul=2.0, kernel_num=5):
    """MMD written out element by element (pairwise squared distances by a double loop)."""
    total = torch.cat([x, y])
    n = total.size(0)
    dist = torch.stack([torch.stack([((total[i] - total[j]) ** 2).sum() for j in range(n)]) for i in range(n)])
    bw = dist.detach().sum() / (n * n - n) / kernel_mul ** (kernel_num // 2)
    k = sum(torch.exp(-dist / (bw * kernel_mul ** i)) for i in range(kernel_num))
    b = x.size(0)
    return (k[:b, :b] + k[b:, b:] - k[:b, b:] - k[b:, :b]).mean()


def official_ce(logits, ids, mask):
    """The official masked_token_ce_loss: logits zeroed where mask[:-1] is 0, labels ids*mask, 0 ignored."""
    sl = logits[:, :-1] * mask[:, :-1].unsqueeze(-1)
    labels = (ids * mask)[:, 1:].long()
    labels[labels == 0] = -100
    return F.cross_entropy(sl.reshape(-1, sl.size(-1)), labels.reshape(-1))


def pad_to(b, a):
    out = torch.zeros_like(a)
    r, c = min(a.size(0), b.size(0)), min(a.size(1), b.size(1))
    out[:r, :c] = b[:r, :c]
    return out


def direct_terms(model, harmful, harmless, seed):
    """A plain transcription of the official loss (full logits, every layer kept)."""
    layers = model.model.layers
    acts = {}
    hooks = [layer.mlp.register_forward_hook(lambda m, a, o, i=i: acts.__setitem__(i, o))
             for i, layer in enumerate(layers)]
    out = model(input_ids=harmful["input_ids"], attention_mask=harmful["attention_mask"], output_hidden_states=True)
    for h in hooks:
        h.remove()
    h_ids, a_ids = harmful["input_ids"], harmless["input_ids"]
    mask = (h_ids != pad_to(a_ids, h_ids))
    gen = torch.Generator().manual_seed(seed)
    noise = 0
    for i in range(len(layers)):
        hid = acts[i] * mask.unsqueeze(-1)
        g = torch.randn(hid.shape, generator=gen) * mask.unsqueeze(-1)
        noise = noise + direct_mmd(hid.view(hid.size(0), -1), g.view(g.size(0), -1))
    noise = noise / len(layers)
    fm = mask.float()
    harmful_losses = official_ce(out.logits, h_ids, fm)
    for h in out.hidden_states:
        harmful_losses = harmful_losses + official_ce(model.lm_head(model.model.norm(h)), h_ids, fm)
    harmful_term = harmful_losses / len(out.hidden_states) + 1
    a_mask = (a_ids != pad_to(h_ids, a_ids)).float()
    a_out = model(input_ids=a_ids, attention_mask=harmless["attention_mask"])
    return {"harmless": official_ce(a_out.logits, a_ids, a_mask), "noise": noise, "harmful": harmful_term}


@pytest.mark.parametrize("ckpt,chunk", [(True, 3), (True, 0), (False, 0)])
def test_repnoise_terms_and_gradients_match_the_official_formula(tokenizer, ckpt, chunk):
    model = make_model(len(tokenizer), layers=2, seed=1)
    harmful, harmless = batch_of(tokenizer, HARMFUL[:3]), batch_of(tokenizer, ROWS)
    got = repnoise_terms(model, harmful, harmless, use_checkpoint=ckpt, token_chunk=chunk,
                         generator=torch.Generator().manual_seed(7))
    ref = direct_terms(model, harmful, harmless, seed=7)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-6, msg=k)
    assert got["harmful"] > 1 and got["noise"] > 0
    params = [p for p in model.parameters()]
    g_got = torch.autograd.grad(repnoise_loss(got, 0.1, 0.001), params, allow_unused=True)
    g_ref = torch.autograd.grad(ref["harmless"] + 0.001 * ref["noise"] - 0.1 * torch.log(ref["harmful"]), params,
                                allow_unused=True)
    for a, b in zip(g_got, g_ref):
        if a is None or b is None:
            assert a is None and b is None
        else:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_masked_ce_runs_the_head_only_on_counted_positions():
    gen = torch.Generator().manual_seed(3)
    hidden, lin = torch.randn(2, 6, 4, generator=gen), torch.nn.Linear(4, 10)
    mask = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 1, 1, 0, 1, 1]], dtype=torch.bool)
    targets = torch.tensor([[-100, 3, 4, 5, -100], [7, 1, -100, 2, 9]])
    rows = []

    def head(x):
        rows.append(x.shape[0])
        return lin(x)

    got = masked_ce(head, hidden, mask, targets, 10, use_checkpoint=False)
    logits = lin(hidden[:, :-1]) * mask[:, :-1].unsqueeze(-1)
    torch.testing.assert_close(got, F.cross_entropy(logits.reshape(-1, 10), targets.reshape(-1)))
    assert sum(rows) == 4  # of 10 positions: 7 have a target, 4 of them unzeroed logits


def test_mmd_matches_the_element_wise_definition():
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(3, 10, generator=gen), torch.randn(3, 10, generator=gen)
    torch.testing.assert_close(mmd(x, y), direct_mmd(x, y))
    assert mmd(x, x.clone()).abs() < 1e-6


def test_answer_mask_uses_each_batch_own_labels(tokenizer):
    model = make_model(len(tokenizer), layers=2, seed=2)
    harmful, harmless = batch_of(tokenizer, HARMFUL[:2]), batch_of(tokenizer, ROWS[:2])
    got = repnoise_terms(model, harmful, harmless, mask="answer", generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(got["harmless"], model(**harmless).loss, rtol=1e-5, atol=1e-6)
    out = model(**harmful, output_hidden_states=True)
    lens = [F.cross_entropy(model.lm_head(model.model.norm(h))[:, :-1].reshape(-1, len(tokenizer)),
                            harmful["labels"][:, 1:].reshape(-1)) for h in out.hidden_states]
    torch.testing.assert_close(got["harmful"], (out.loss + sum(lens)) / len(lens) + 1, rtol=1e-5, atol=1e-6)


def test_repnoise_trainer_step_backpropagates_the_loss(tokenizer, tmp_path):
    model = make_model(len(tokenizer), layers=2, seed=3)
    trainer = make_trainer(tokenizer, model, tmp_path, "repnoise", per_device_train_batch_size=2,
                           gradient_accumulation_steps=2)
    batch = batch_of(tokenizer, ROWS[:2])
    harmful = trainer.harmful.batch(0)
    assert harmful["input_ids"].size(0) == 2  # the training batch size, as the official loader
    torch.manual_seed(11)
    trainer.training_step(model, dict(batch))
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    torch.manual_seed(11)
    loss = repnoise_loss(repnoise_terms(model, harmful, batch), 0.1, 0.001) / 2
    loss.backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(got[n], p.grad, rtol=1e-4, atol=1e-7, msg=n)
    assert set(trainer._extra) == {"harmless_loss", "noise_mmd", "harmful_lens_loss"}


def test_short_repnoise_run(tokenizer, tmp_path):
    model = make_model(len(tokenizer), layers=2, seed=4)
    trainer = make_trainer(tokenizer, model, tmp_path, "repnoise", max_steps=4, learning_rate=1e-2)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "harmless_loss" in h]
    assert len(logs) == 4 and all(torch.isfinite(torch.tensor(h["loss"])) for h in logs)
    assert logs[-1]["harmless_loss"] < logs[0]["harmless_loss"]


def test_repnoise_options_are_checked(tmp_path):
    with pytest.raises(SinkguardError, match="mask"):
        make_config("repnoise", "alignment", tmp_path, mask="all")
    with pytest.raises(SinkguardError, match="beta"):
        make_config("repnoise", "alignment", tmp_path, beta=-0.1)
    args = make_config("repnoise", "alignment", tmp_path)
    assert (args.alpha, args.beta, args.mask) == (0.1, 0.001, "official")
