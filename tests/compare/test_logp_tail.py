"""The logit path of the whole-model gradients from ℓ_t's coefficients: the same numbers as
autograd's K backward passes through the logits.

`head_gradients` forms ‖∂L/∂W'‖² from Gram matrices over the tokens and the tied rows from
π's columns R; the reference is ∂L/∂W' = Aᵀ diag(c) H itself, built in float64 from the same
operands, so the two differ by float64 rounding only (1e-12 relative is generous). The whole-
model runs compare the tail against the autograd path it replaces (`cheaper` forced false) on
three architectures: untied, tied (GPT-2), and an lm_head bias column (Phi).
"""

from __future__ import annotations

import pytest
import torch
from helpers import model_grad_norms

from gradlens.compare import run_compare
from gradlens.compare.logp_tail import cheaper, head_gradients, logp_tail
from gradlens.config import validate
from gradlens.grads import policy_pass


def reference(probs, tokens, hidden, c, hidden_size):
    """∂L/∂W' = Aᵀ diag(c) H in float64, A = e_y − π."""
    a = -probs.double()
    a[torch.arange(len(tokens)), tokens] += 1.0
    return a.T @ (c.double()[:, None] * hidden.double())  # [V, H']


def random_case(m, v, width, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    logits = 3.0 * torch.randn(m, v, generator=g, dtype=dtype)
    probs = torch.softmax(logits, -1)
    tokens = torch.randint(0, v, (m,), generator=g)
    tokens[1] = tokens[0]  # a token sampled twice
    hidden = torch.randn(m, width, generator=g, dtype=dtype)
    return probs, tokens, hidden, g


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("vocab", [50, 4096])
def test_the_gram_squares_and_rows_equal_the_gradient_itself(bias, vocab):
    m, h = 24, 16
    probs, tokens, hidden, g = random_case(m, vocab, h + int(bias), seed=vocab + int(bias))
    if bias:
        hidden[:, h] = 1.0
    cs = [torch.randn(m, generator=g), torch.ones(m), torch.zeros(m)]
    rows = torch.unique(torch.cat([tokens[:5], torch.randint(0, vocab, (7,), generator=g)]))
    got = head_gradients(probs, tokens, hidden, cs, h, rows)
    for c, head in zip(cs, got, strict=True):
        full = reference(probs, tokens, hidden, c, h)
        scale = float(full.pow(2).sum()) + 1e-300
        assert head.weight_sq == pytest.approx(
            float(full[:, :h].pow(2).sum()), rel=1e-12, abs=1e-14 * scale
        )
        assert head.bias_sq == pytest.approx(
            float(full[:, h:].pow(2).sum()), rel=1e-12, abs=1e-14 * scale
        )
        assert head.rows is not None and head.rows.dtype == torch.float64
        torch.testing.assert_close(head.rows, full[rows, :h], rtol=1e-12, atol=1e-14)
    assert got[2].weight_sq == 0.0 and float(got[2].rows.abs().max()) == 0.0  # c = 0: nothing
    assert head_gradients(probs, tokens, hidden, cs[:1], h, None)[0].rows is None


def test_a_vocabulary_of_262144_and_gradients_that_cancel():
    # Two tokens with the same y, h and π and opposite c cancel exactly: ∂L/∂W' = 0 for them,
    # while Σ_t c_t²‖a_t‖²‖h_t‖² is not small. With a third token the squared norm is that
    # token's alone; the float64 Gram keeps it though the cancelled pair's terms are far larger.
    v, h = 262_144, 8
    probs, tokens, hidden, _ = random_case(3, v, h, seed=3)
    probs[1], tokens[1], hidden[1] = probs[0], tokens[0], hidden[0]
    c = torch.tensor([1e3, -1e3, 1e-2])
    (head,) = head_gradients(probs, tokens, hidden, [c], h, None)
    expected = float(reference(probs, tokens, hidden, c, h).pow(2).sum())
    alone = float(reference(probs[2:], tokens[2:], hidden[2:], c[2:], h).pow(2).sum())
    assert expected == pytest.approx(alone, rel=1e-9)
    assert head.weight_sq == pytest.approx(expected, rel=1e-6)


def test_the_hidden_cotangents_are_autograds():
    # ∂L/∂h = c·(W'_y − W'ᵀπ) on the grid, zero off the mask: autograd of Σ c_t ℓ_t.
    g = torch.Generator().manual_seed(5)
    n, t, h, v = 3, 5, 6, 40
    hidden = torch.randn(n, t, h, generator=g, dtype=torch.float64)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64)
    tokens = torch.randint(0, v, (n, t), generator=g)
    mask = torch.rand(n, t, generator=g) < 0.7
    with torch.no_grad():
        policy = policy_pass(hidden, weight, tokens, mask)
    cs = [torch.randn(int(mask.sum()), generator=g, dtype=torch.float64) for _ in range(2)]
    tail = logp_tail(policy, weight, cs, hidden.shape, h, None)
    for c, got in zip(cs, tail.hidden_cotangents, strict=True):
        leaf = hidden.clone().requires_grad_(True)
        p = policy_pass(leaf, weight, tokens, mask)
        (p.logp[mask] * c).sum().backward()
        torch.testing.assert_close(got, leaf.grad, rtol=1e-12, atol=1e-14)


def test_the_tail_is_taken_where_it_is_cheaper_and_fits():
    assert cheaper(384, 4, 576, 49_152)  # the default model run: 768 ≤ 7·576
    assert not cheaper(384, 1, 576, 49_152)  # one loss: 768 > 576, autograd's products win
    assert cheaper(288, 1, 576, 49_152) and not cheaper(289, 1, 576, 49_152)
    # 10 losses of a 4,096-wide model: cheaper up to M = 38,912 tokens, but the [M, M] float64
    # matrices must fit in one [M, V] float32 logit tensor's memory: 8·M ≤ V
    assert cheaper(4_096, 10, 4_096, 32_768) and not cheaper(4_097, 10, 4_096, 32_768)


def test_the_gram_blocks_sum_to_the_whole_product(monkeypatch):
    from gradlens.compare import logp_tail as tail

    probs, tokens, hidden, _ = random_case(7, 300, 4, seed=9)
    whole = head_gradients(probs, tokens, hidden, [torch.ones(7)], 4, None)[0]
    monkeypatch.setattr(tail, "GRAM_ENTRIES", 7 * 13)  # blocks of 13 columns, the last short
    blocked = head_gradients(probs, tokens, hidden, [torch.ones(7)], 4, None)[0]
    assert blocked.weight_sq == pytest.approx(whole.weight_sq, rel=1e-13)


def run(path, losses, entropy=0.0):
    cfg = {
        "dtype": "float64",
        "losses": losses,
        "loss": {"entropy_coef": entropy},
        "source": {
            "kind": "model",
            "path": str(path),
            "prompts": ["def add(a, b):\n", "import os\n"],
            "group_size": 2,
            "max_new_tokens": 6,
            "reward": "length",
            "rollout_dtype": "float32",
            "stale": {"steps": 1, "lr": 1e-3, "target_kl": None},
        },
        "diagnostics": {"engine": "materialized"},
    }
    return run_compare(validate(cfg))


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "gpt2", "phi"])  # untied, tied, a bias column
def test_the_tail_gives_autograds_norms(checkpoints, arch, monkeypatch):
    losses = ["reinforce", "ppo_clip", "gspo", "sft"]  # gspo: c_t from a sequence's ratio
    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        return logp_tail(*args, **kwargs)

    monkeypatch.setattr("gradlens.compare.model_grads.logp_tail", counted)
    fast = run(checkpoints[arch], losses)
    assert calls, "the tail was not taken"
    monkeypatch.setattr("gradlens.compare.model_grads.cheaper", lambda *a: False)
    calls.clear()
    slow = run(checkpoints[arch], losses)
    assert not calls
    assert fast.model.gradient_pass == slow.model.gradient_pass
    for name, values in model_grad_norms(fast).items():
        for a, b in zip(values, model_grad_norms(slow)[name], strict=True):
            assert (a is None) == (b is None)
            if a is not None:
                assert a == pytest.approx(b, rel=1e-10), name
    if arch == "gpt2":
        assert all(r.model_grads.tied_grad_norm for r in fast.losses)


@pytest.mark.slow
def test_an_entropy_bonus_keeps_autograd(checkpoints, monkeypatch):
    # The bonus reads every logit, not ℓ_t alone: the tail must not be taken.
    def refused(*args, **kwargs):
        raise AssertionError("the tail was taken for a loss with an entropy bonus")

    monkeypatch.setattr("gradlens.compare.model_grads.logp_tail", refused)
    report = run(checkpoints["llama"], ["reinforce", "ppo_clip", "sft"], entropy=0.05)
    assert all(r.model_grads is not None for r in report.losses)
