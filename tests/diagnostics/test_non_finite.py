"""A non-finite gradient is traced to its first non-finite value, not blamed on the ratio.

Each batch here is built in Python (the engines do not validate: a model's own NaN, or a batch
handed to the engine directly, reaches them) with one non-finite value planted at a known
place; the finding must name that tensor and position, or the loss term that produced it. The
ratio is blamed only when r = exp(ℓ − ℓ_old) itself overflowed.
"""

from __future__ import annotations

import dataclasses

import torch
from helpers import make_batch

from gradlens.compare.engines import EngineOptions
from gradlens.compare.findings import signal
from gradlens.compare.materialized import run_materialized
from gradlens.compare.records import loss_report
from gradlens.containers import Batch, Origin
from gradlens.diagnostics.non_finite import trace
from gradlens.grads import objective, softmax_view
from gradlens.losses import Aggregation, LossParams, get_loss

F32 = torch.float32


def small_batch(dtype: torch.dtype = torch.float64) -> Batch:
    """2 sequences × 3 positions, V = 5, H = 4, every position in the loss, off-policy."""
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, 3, 4, generator=gen, dtype=torch.float64).to(dtype)
    weight = torch.randn(5, 4, generator=gen, dtype=torch.float64).to(dtype)
    tokens = torch.tensor([[0, 1, 2], [3, 4, 0]])
    mask = torch.ones(2, 3, dtype=torch.bool)
    old = -torch.ones(2, 3, dtype=torch.float64)
    return make_batch(hidden, weight, tokens, mask, old_logp=old)


def finding(batch: Batch, loss: str = "ppo") -> str:
    """The non-finite finding of ``loss`` on ``batch``, through the engine and the report."""
    spec = get_loss(loss)
    run = run_materialized(
        batch, [spec], LossParams(), Aggregation(), EngineOptions(reference="none"), "test"
    )
    report = loss_report(run.records[0], batch, run.tokens.logp, LossParams())
    assert report.non_finite > 0
    notes = [f for f in report.findings if "NaN or inf" in f]
    assert len(notes) == 1, report.findings
    return notes[0]


def test_a_nan_advantage_is_named_with_its_position():
    batch = small_batch()
    adv = batch.advantages.clone()
    adv[1, 2] = float("nan")
    note = finding(dataclasses.replace(batch, advantages=adv))
    assert "the input batch.advantages[1, 2] is NaN" in note
    assert "log-ratio" not in note  # main: "the largest log-ratio … overflows"


def test_inf_in_a_models_hidden_states_is_named_as_computed_by_it():
    batch = small_batch()
    hidden = batch.hidden.clone()
    hidden[0, 1, 3] = float("inf")
    origin = Origin(lambda f, i: f"the model's {f}{list(i)}", frozenset({"hidden"}))
    note = finding(dataclasses.replace(batch, hidden=hidden, origin=origin))
    assert "the model's hidden[0, 1, 3] (computed by the model) is +inf" in note


def test_logits_that_overflow_from_finite_inputs():
    # h = 1e20·e_0 and W = 1e20 everywhere: z = 1e40, beyond float32's 3.4e38
    batch = small_batch(F32)
    hidden = torch.zeros_like(batch.hidden)
    hidden[..., 0] = 1e20
    weight = torch.full_like(batch.weight, 1e20)
    note = finding(dataclasses.replace(batch, hidden=hidden, weight=weight))
    assert "the logits z = W·h at sequence 0, position 0 are not finite in float32" in note


def test_an_overflowing_ratio_is_blamed_on_the_ratio():
    # ℓ_old = −200 at (1, 1): log r ≈ 200 − 1.6 > log(3.4e38) ≈ 88.7, so r = inf in float32
    batch = small_batch(F32)
    old = batch.old_logp.clone()
    old[1, 1] = -200.0
    note = finding(dataclasses.replace(batch, old_logp=old))
    assert "the log-ratio log(π_θ/π_old) at sequence 1, position 1 is" in note
    assert "overflows float32" in note


def test_a_user_loss_that_returns_nan_is_named(tmp_path):
    path = tmp_path / "nan_loss.py"
    path.write_text(
        "def fn(logp, old_logp, advantages, mask):\n    return (logp * mask).sum() * float('nan')\n"
    )
    note = finding(small_batch(), f"{path}:fn")
    assert f"the loss '{path}:fn' returned NaN from finite inputs" in note


def test_the_trace_reads_the_inputs_in_order():
    # two planted values: the advantage comes before the hidden state in the computation
    batch = small_batch()
    adv, hidden = batch.advantages.clone(), batch.hidden.clone()
    adv[1, 0] = float("inf")
    hidden[0, 0, 0] = float("nan")
    batch = dataclasses.replace(batch, advantages=adv, hidden=hidden)
    logp = softmax_view(batch).logp
    obj = objective(batch, logp, get_loss("reinforce"), LossParams(), Aggregation())
    assert trace(batch, logp, obj, "reinforce").startswith(
        "the input batch.advantages[1, 0] is +inf"
    )


def test_a_masked_position_is_never_blamed():
    # NaN where the mask is off is never read: with the ratio overflowing elsewhere, the trace
    # blames the ratio, not the masked advantage
    batch = small_batch(F32)
    mask = batch.mask.clone()
    mask[0, 2] = False
    adv, old = batch.advantages.clone(), batch.old_logp.clone()
    adv[0, 2] = float("nan")
    old[1, 1] = -200.0
    batch = dataclasses.replace(batch, mask=mask, advantages=adv, old_logp=old)
    spec = get_loss("ppo")
    logp = softmax_view(batch).logp
    obj = objective(batch, logp, spec, LossParams(), Aggregation())
    assert "log-ratio" in trace(batch, logp, obj, "ppo")
    assert not signal(batch, logp, obj, spec, LossParams()).zero
