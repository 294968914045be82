"""`check_training_pass`: gradlens's π_old of the first sequence against the model's forward.

On the built-in model, gradlens's own pass (`score_alone`: final hidden states times W) and the
model's ``model(ids).logits`` differ by rounding only, far inside the bound 2·ε·max|z|/T; a
log-prob moved by more than the bound is refused, by less is not.
"""

from __future__ import annotations

import pytest
import torch

from gradlens.containers import Sequences
from gradlens.sources.checkpoint import load_checkpoint
from gradlens.sources.forward import position_ids
from gradlens.sources.passes import score_alone
from gradlens.sources.training_pass_check import (
    TrainingPassMismatch,
    check_training_pass,
    reference_pass,
)

CPU = torch.device("cpu")
TEMPERATURE = 0.7


def left_padded(ids: list[list[int]], prompt: int) -> Sequences:
    """Sequences of different lengths, left-padded; every token after ``prompt`` in the loss."""
    width = max(len(x) for x in ids)
    grid = torch.zeros(len(ids), width, dtype=torch.long)
    attention = torch.zeros(len(ids), width, dtype=torch.long)
    for i, x in enumerate(ids):
        grid[i, width - len(x) :] = torch.tensor(x)
        attention[i, width - len(x) :] = 1
    loss = torch.zeros(len(ids), width - 1, dtype=torch.bool)
    for i, x in enumerate(ids):
        loss[i, width - len(x) + prompt - 1 :] = True
    return Sequences(grid, attention, position_ids(attention), loss)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gradlens_pass_is_within_the_bound_and_a_shifted_one_is_not(dtype):
    loaded = load_checkpoint(None, CPU, dtype)
    gen = torch.Generator().manual_seed(0)
    ids = [torch.randint(3, 2000, (n,), generator=gen).tolist() for n in (14, 9, 12)]
    seqs = left_padded(ids, prompt=4)
    ref = reference_pass(loaded.model, seqs, TEMPERATURE)
    ours = score_alone(loaded.model, seqs, TEMPERATURE, loaded.bias)[0]
    mask = seqs.loss_mask[0]
    assert int(mask.sum()) == 10  # the first row (14 tokens, prompt 4): 10 scored, no padding
    gap = float((ours - ref.logp).abs()[mask].max())
    assert gap <= ref.bound / 10  # rounding only
    eps = {torch.float32: 1e-4, torch.float64: 1e-9}[dtype]
    with torch.no_grad():
        z = loaded.model(input_ids=torch.tensor([ids[0]])).logits[0, :-1]
    assert ref.bound == pytest.approx(2 * eps * float(z.abs().max()) / TEMPERATURE, rel=1e-6)
    check_training_pass(ref, ours)
    moved = ours.clone()
    moved[mask.nonzero()[3]] += 0.5 * ref.bound
    check_training_pass(ref, moved)  # within rounding's reach
    moved[mask.nonzero()[3]] += 2 * ref.bound
    with pytest.raises(TrainingPassMismatch, match=r"at grid position \d+, more than"):
        check_training_pass(ref, moved)


def test_positions_off_the_loss_are_not_compared():
    loaded = load_checkpoint(None, CPU, torch.float32)
    seqs = left_padded([[5, 6, 7, 8, 9, 10], [11, 12, 13]], prompt=3)
    ref = reference_pass(loaded.model, seqs, 1.0)
    ours = score_alone(loaded.model, seqs, 1.0, loaded.bias)[0]
    ours[~seqs.loss_mask[0]] = -50.0  # prompt positions: not π_old of anything scored
    check_training_pass(ref, ours)


@pytest.mark.parametrize("moved", ["rollout", "none"])
def test_the_model_source_checks_its_rollout_and_its_training_pass(monkeypatch, moved):
    # a sampler whose μ of sequence 0 is off by 1 nat at one token (a cache bug's size) stops
    # the run; the sampler as it is passes both checks
    from gradlens.compare import run_compare
    from gradlens.config import build_config
    from gradlens.sources import model as model_source

    sample = model_source.sample

    def shifted(*args, **kwargs):
        out = sample(*args, **kwargs)
        if moved == "rollout":
            first = out.sequences.loss_mask[0].nonzero()[0]
            out.rollout_logp[0, first] -= 1.0
        return out

    monkeypatch.setattr(model_source, "sample", shifted)
    config = build_config(
        None, ["source.kind=model", "source.num_prompts=2", "source.group_size=2",
               "source.max_new_tokens=6", "source.stale.steps=0"],
    )  # fmt: skip
    if moved == "none":
        assert run_compare(config).passed
        return
    with pytest.raises(
        TrainingPassMismatch, match=r"the rollout's log-probs \(log μ\) of sequence 0 are not"
    ):
        run_compare(config)
