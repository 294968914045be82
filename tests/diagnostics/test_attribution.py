"""The attribution of the lm_head update against its autograd twins, in both engines.

Every quantity of `gradlens.diagnostics.attribution` is checked against an independent float64
computation by torch.autograd, for every registered loss and every aggregation, through the
materialized engine and the streamed one (small chunks, so that the sums really run over many
chunks; hidden size 4 below the longest sequences' 7 tokens, so that both ways of the
per-sequence norms run: ghost and direct):

- token shares g_tᵀ G h_t/‖G‖² with g_t and G from autograd; token norms ‖g_t‖‖h_t‖;
- per-sequence norms and shares against one backward pass per sequence (the sequence's terms
  Σ_{t∈i} c_t ℓ_t with the batch's c_t detached, and its entropy-bonus terms);
- the loss components against autograd of the KL penalty and of the entropy bonus alone;
- the entropy change per unit step against autograd's ∂H_t/∂z_t along each step's Δz_t/η
  (−G h_t for the lm_head step, −g_t for the logit step), and against a real step whose error
  shrinks linearly with η;
- shares summing to 1 (a property test) and a hand-computed case.
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import pytest
import torch
from helpers import build_batch, literal_config, make_batch
from hypothesis import given, settings
from hypothesis import strategies as st

from gradlens.compare.engines import EngineOptions
from gradlens.compare.materialized import run_materialized
from gradlens.compare.run import compare_batch
from gradlens.compare.streamed import run_streamed
from gradlens.containers import Batch, valid_index
from gradlens.diagnostics.attribution import TokenShares, attribution, token_shares
from gradlens.grads import (
    closed_form,
    entropy_bonus,
    objective,
    policy_entropy,
    policy_pass,
    softmax_view,
)
from gradlens.losses import Aggregation, LossParams, LossSpec, get_loss, loss_names
from gradlens.losses.aggregation import AGGREGATIONS
from gradlens.losses.base import Correction

F64 = torch.float64
NAMES = loss_names()
MODES = list(AGGREGATIONS)
ENGINES = ["materialized", "streamed"]
ENTROPY_COEF = 0.05
# float64 throughout; engine and twin differ only in the order of their sums (the streamed
# engine over 4-row chunks, the ghost Gram against the direct product): a few hundred terms of
# ≤ 1 ulp each relative to the quantity's scale, far inside 1e-10 (the bound).
TOL = 1e-10


def params_for(i: int, entropy: bool) -> LossParams:
    """Narrow clips and the dual clip (many tokens in a region), β large enough to matter, and
    every other case a training–inference correction."""
    return LossParams(
        eps_low=0.1,
        eps_high=0.1,
        dual_clip=2.0,
        kl_coef=0.3,
        entropy_coef=ENTROPY_COEF if entropy else 0.0,
        corrections=(Correction("token_tis", None, 1.5),) if i % 2 else (),
    )


def attribution_batch(seed: int, n: int = 6, t: int = 7, v: int = 13, h: int = 4) -> Batch:
    """Ragged sequences (one of full length t > h: a direct-norm block), advantages of both
    signs and one exactly 0, π_old, μ_old and π_ref drifted from π_θ, prompt groups of three."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, t + 1, (n,), generator=gen)
    lengths[0] = t
    mask = torch.arange(t)[None, :] < lengths[:, None]  # [N, T]
    hidden = torch.randn(n, t, h, generator=gen, dtype=F64)  # [N, T, H]
    weight = 1.5 * torch.randn(v, h, generator=gen, dtype=F64) / math.sqrt(h)  # [V, H]
    tokens = torch.randint(0, v, (n, t), generator=gen)  # [N, T]
    adv = torch.randn(n, generator=gen, dtype=F64)
    adv[1] = 0.0
    # both signs in each prompt group of three (REAL skips a group without): + at 0, 3; − at 2, 5
    adv[0], adv[3] = adv[0].abs(), adv[3].abs()
    adv[2], adv[5] = -adv[2].abs(), -adv[5].abs()
    batch = make_batch(hidden, weight, tokens, mask, advantages=adv[:, None].expand(n, t).clone())
    noise = torch.randn(3, n, t, generator=gen, dtype=F64)
    old = batch.old_logp - 0.4 * noise[0]
    return dataclasses.replace(
        batch,
        old_logp=old,
        rollout_logp=old - 0.2 * noise[1],
        ref_logp=old + 0.3 * noise[2],
        groups=torch.arange(n) // 3,  # prompt groups of three (prompt_average, real)
    )


def engine_shares(
    batch: Batch, spec: LossSpec, params: LossParams, agg: Aggregation, engine: str
) -> tuple[TokenShares, object]:
    """The engine's per-token numbers and the loss's report section."""
    options = EngineOptions(reference="none", attribution=True, vocab_chunk=4)
    runner = run_materialized if engine == "materialized" else run_streamed
    run = runner(batch, [spec], params, agg, options, "test")
    record = run.records[0]
    assert record.attribution is not None
    obj = record.objective
    rows, cols = valid_index(batch.mask)
    penalty = obj.terms.penalty_grad
    c = obj.coefficient[rows, cols]
    c_kl = torch.zeros_like(c) if penalty is None else (obj.weights * penalty)[rows, cols]
    w = params.entropy_coef * obj.bonus_weights[rows, cols]
    shares = token_shares(record.attribution, c, c_kl, w, rows, batch.num_sequences)
    section = attribution(
        record.attribution, obj, batch, run.tokens.logp, params.entropy_coef, top_k=100
    )
    return shares, section


@dataclasses.dataclass(frozen=True)
class Twin:
    """The same quantities by autograd, float64."""

    share: torch.Tensor  # [M]
    norm: torch.Tensor  # [M]
    sequence_share: torch.Tensor  # [N]
    sequence_norm: torch.Tensor  # [N]
    components: dict[str, float]
    entropy_lm_head: torch.Tensor  # [M] dH_t/dη
    entropy_logit: torch.Tensor  # [M]


def _grad_w(loss: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    (g,) = torch.autograd.grad(loss, weight, retain_graph=True, allow_unused=True)
    return torch.zeros_like(weight) if g is None else g


def autograd_twin(batch: Batch, spec: LossSpec, params: LossParams, agg: Aggregation) -> Twin:
    weight = batch.weight.detach().clone().requires_grad_(True)
    p = policy_pass(batch.hidden, weight, batch.tokens, batch.mask)
    p.logits.retain_grad()
    p.logp.retain_grad()
    bonus = params.entropy_coef != 0.0
    read = policy_entropy(p, [spec], params)  # H_t: the bonus's, or detached for aspo & co.
    obj = objective(batch, p.logp, spec, params, agg, read)
    entropy = read if bonus else None
    big_g = _grad_w(obj.loss, weight)  # [V, H]
    (g, c_grid) = torch.autograd.grad(obj.loss, (p.logits, p.logp), retain_graph=True)
    h = p.hidden.detach()  # [M, H]
    total = big_g.square().sum()
    share = (g * (h @ big_g.T)).sum(-1) / total
    norm = g.norm(dim=-1) * h.norm(dim=-1)

    # one backward per sequence: Σ_{t∈i} c_t ℓ_t (c_t detached) and its bonus terms
    c_grid = c_grid.detach()
    seq_share, seq_norm = [], []
    for i in range(batch.num_sequences):
        in_seq = torch.zeros_like(batch.mask)
        in_seq[i] = batch.mask[i]
        part = (c_grid * p.logp * in_seq).sum()
        if entropy is not None:
            part = part + entropy_bonus(obj.bonus_weights * in_seq, entropy, params.entropy_coef)
        g_i = _grad_w(part, weight)
        seq_share.append((g_i * big_g).sum() / total)
        seq_norm.append(g_i.norm())

    components = {}
    parts = {}
    if obj.terms.penalty is not None:
        parts["kl"] = _grad_w((obj.weights * obj.terms.penalty).sum(), weight)
    if entropy is not None:
        parts["entropy_bonus"] = _grad_w(
            entropy_bonus(obj.bonus_weights, entropy, params.entropy_coef), weight
        )
    policy = big_g - sum(parts.values(), torch.zeros_like(big_g))
    for name, g_k in {"policy": policy, **parts}.items():
        components[name] = float((g_k * big_g).sum() / total)

    # ∂H_t/∂z_t by autograd (H_t depends on its own logits only), along each step's Δz_t/η
    z = p.logits.detach().clone().requires_grad_(True)
    log_probs = torch.log_softmax(z, dim=-1)
    (dh_dz,) = torch.autograd.grad(-(log_probs.exp() * log_probs).sum(), z)  # [M, V]
    rate_head = (dh_dz * -(h @ big_g.T)).sum(-1)  # Δz_t = −η·G h_t
    rate_logit = (dh_dz * -g).sum(-1)  # Δz_t = −η·g_t
    return Twin(
        share.detach(),
        norm.detach(),
        torch.stack(seq_share).detach(),
        torch.stack(seq_norm).detach(),
        components,
        rate_head,
        rate_logit,
    )


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max|a − b| / max|b|."""
    scale = float(b.abs().max())
    return float((a - b).abs().max()) / max(scale, 1e-300)


CASES = [(name, mode) for name in NAMES for mode in MODES]


@pytest.mark.parametrize("name, mode", CASES, ids=[f"{n}-{m}" for n, m in CASES])
def test_every_quantity_matches_its_autograd_twin_in_both_engines(name: str, mode: str):
    i = CASES.index((name, mode))
    entropy = i % 2 == 1  # every loss with and without the bonus, over its aggregations
    params = params_for(i // 2, entropy)
    agg = Aggregation(mode, 9.0 if mode == "seq_mean_token_sum_norm" else None)
    batch = attribution_batch(seed=i)
    spec = get_loss(name)
    twin = autograd_twin(batch, spec, params, agg)
    if bool(torch.isnan(twin.share).all()):  # G = 0 (e.g. every token outside rollout_is's band)
        for engine in ENGINES:  # no shares of nothing: the section says so by being absent
            assert engine_shares(batch, spec, params, agg, engine)[1] is None, engine
        return
    for engine in ENGINES:
        got, section = engine_shares(batch, spec, params, agg, engine)
        where = f"{name}/{mode}/{engine}"
        assert rel(got.share, twin.share) < TOL, where
        assert rel(got.norm, twin.norm) < TOL, where
        assert rel(got.sequence_share, twin.sequence_share) < TOL, where
        assert rel(got.sequence_norm, twin.sequence_norm) < TOL, where
        assert rel(got.entropy_lm_head, twin.entropy_lm_head) < TOL, where
        assert rel(got.entropy_logit, twin.entropy_logit) < TOL, where
        assert section is not None
        shares = section.groups["component"].shares
        assert set(shares) == set(twin.components), where
        for key, value in twin.components.items():
            assert shares[key] == pytest.approx(value, rel=TOL, abs=TOL), f"{where} {key}"
        # the advantage-sign groups are sums of the twin's token shares
        adv = batch.advantages[batch.mask]
        signs = section.groups["advantage_sign"].shares
        for key, sel in (("positive", adv > 0), ("negative", adv < 0), ("zero", adv == 0)):
            assert signs[key] == pytest.approx(float(twin.share[sel].sum()), abs=TOL), where


@pytest.mark.slow  # 15 batches × both engines
@pytest.mark.parametrize("engine", ENGINES)
@given(
    seed=st.integers(0, 10_000),
    name=st.sampled_from(NAMES),
    mode=st.sampled_from(MODES),
    entropy=st.booleans(),
)
@settings(max_examples=15, deadline=None)
def test_shares_sum_to_one(engine: str, seed: int, name: str, mode: str, entropy: bool):
    """Over tokens, over sequences, and over every partition of the report."""
    batch = attribution_batch(seed)
    agg = Aggregation(mode, 9.0 if mode == "seq_mean_token_sum_norm" else None)
    got, section = engine_shares(batch, get_loss(name), params_for(seed, entropy), agg, engine)
    if section is None:  # ‖G‖ = 0 (e.g. every advantage 0 and no penalty): nothing to share
        return
    # float64: M ≈ 25 terms of ≤ 1 ulp relative to the largest share (≲ 10), and ‖G‖² from the
    # row norms against Σ_t s_t: 1e-10 is generous
    assert float(got.share.sum()) == pytest.approx(1.0, abs=1e-10)
    assert float(got.sequence_share.sum()) == pytest.approx(1.0, abs=1e-10)
    assert section.share_sum == pytest.approx(1.0, abs=1e-10)
    for group, part in section.groups.items():
        total = sum(v for v in part.shares.values() if v is not None)
        assert total == pytest.approx(1.0, abs=1e-10), group
        if group != "component":  # a partition of the tokens
            assert sum(part.tokens.values()) == int(batch.mask.sum()), group


def test_hand_computed_two_tokens():
    """Literal positions have orthonormal h_k = e_k, so G h_k = g_k and s_k = ‖g_k‖².

    π = [0.5, 0.2, 0.15, 0.1, 0.05] at both tokens; REINFORCE, token_mean (a = 1/2):
      token 1: y = 0, A = +1: c = −½;  ‖e_y − π‖² = 0.5² + (0.2² + 0.15² + 0.1² + 0.05²)
                                                     = 0.25 + 0.075 = 0.325
      token 2: y = 1, A = −1: c = +½;  ‖e_y − π‖² = 0.8² + (0.5² + 0.15² + 0.1² + 0.05²)
                                                     = 0.64 + 0.285 = 0.925
      ‖g_1‖² = ¼·0.325 = 0.08125, ‖g_2‖² = ¼·0.925 = 0.23125, ‖G‖² = 0.3125
      shares 0.08125/0.3125 = 0.26 and 0.23125/0.3125 = 0.74; each token is its own sequence,
      so the sequence shares are the same; norms |c|·‖e_y − π‖·‖e_k‖ = ½√0.325, ½√0.925.
    """
    pi = [0.5, 0.2, 0.15, 0.1, 0.05]
    config = literal_config(
        [
            [{"probs": pi, "token": 0, "advantage": 1.0}],
            [{"probs": pi, "token": 1, "advantage": -1.0}],
        ],
        ["reinforce"],
    )
    batch = build_batch(config)
    report = compare_batch(batch, config, torch.device("cpu"))
    att = report.losses[0].attribution
    assert att is not None
    assert att.grad_norm_sq == pytest.approx(0.3125, rel=1e-12)
    by_seq = {s.sequence: s for s in att.top_sequences}
    assert by_seq[0].share == pytest.approx(0.26, rel=1e-12)
    assert by_seq[1].share == pytest.approx(0.74, rel=1e-12)
    assert by_seq[0].norm == pytest.approx(0.5 * math.sqrt(0.325), rel=1e-12)
    tokens = {(t.sequence, t.position): t for t in att.top_tokens}
    assert tokens[(1, 0)].share == pytest.approx(0.74, rel=1e-12)
    assert tokens[(1, 0)].norm == pytest.approx(0.5 * math.sqrt(0.925), rel=1e-12)
    assert att.top_tokens[0].sequence == 1  # the larger share first
    assert att.groups["advantage_sign"].shares == pytest.approx(
        {"positive": 0.26, "negative": 0.74, "zero": 0.0}, rel=1e-12
    )
    assert att.sequences_to_half == 1 and att.sequences_to_half_share == pytest.approx(0.74)


@pytest.mark.parametrize("step", ["lm_head", "logit"])
def test_entropy_change_agrees_with_a_real_step_to_first_order(step: str):
    """A real step of size η against η·dH/dη: the error is O(η²), so relative to the change it
    is O(η) and halves when η halves (float64: the changes are ~1e-5, rounding ~1e-16)."""
    batch = attribution_batch(seed=7)
    params = params_for(0, entropy=True)
    spec, agg = get_loss("grpo"), Aggregation("seq_mean_token_mean")
    got, _ = engine_shares(batch, spec, params, agg, "materialized")
    rate = got.entropy_lm_head if step == "lm_head" else got.entropy_logit
    view = softmax_view(batch)
    grads = closed_form(batch, view, spec, params, agg)

    def entropy(z: torch.Tensor) -> torch.Tensor:
        log_probs = torch.log_softmax(z, dim=-1)
        return -(log_probs.exp() * log_probs).sum(-1)

    def real_change(eta: float) -> torch.Tensor:
        if step == "lm_head":
            z = view.hidden @ (batch.weight - eta * grads.grad_weight).T
        else:
            z = view.logits - eta * grads.grad_logits
        return entropy(z) - view.entropy

    errors = []
    for eta in (1e-3, 5e-4, 2.5e-4):
        predicted = eta * rate
        errors.append(float((real_change(eta) - predicted).norm() / predicted.norm()))
    assert errors[0] < 1e-2  # first order already at η = 1e-3
    for big, small in itertools.pairwise(errors):
        assert 1.8 < big / small < 2.2, errors  # linear in η
    # the mean over tokens, as reported
    mean_rate = float(rate.mean())
    assert abs(float(real_change(1e-4).mean()) / 1e-4 - mean_rate) < 1e-2 * abs(mean_rate)
