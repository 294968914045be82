"""Whole-model gradients in micro-batches equal the one-pass ones, and a plain autograd twin.

The memory budget decides how the sequences go through the model: one forward for the whole
batch with one backward per loss, or micro-batches whose gradients are summed per loss (with
as many losses sharing a forward as their sums fit the budget). Every way must give the same
norms: in float64 the plans differ only in summation order (1e-10 relative is generous).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from types import SimpleNamespace

import pytest
import torch

from gradlens.compare import run_compare
from gradlens.compare.model_grads import logit_path_weight, parameter_groups
from gradlens.config import validate
from gradlens.results import CompareReport
from gradlens.sources.blockwise import BlockwiseUnsupported
from gradlens.sources.checkpoint import load_checkpoint
from gradlens.sources.forward import head_weight

transformers = pytest.importorskip("transformers")

from helpers import model_grad_norms  # noqa: E402

PROMPTS = ["def add(a, b):\n", "class Point:\n    def __init__(self", "import os\n"]
LOSSES = ["reinforce", "ppo_clip", "gspo", "sft"]  # gspo: one ratio per sequence


def run(path, budget_mib=None, entropy=0.0, shared_prefix=True) -> CompareReport:
    cfg = {
        "dtype": "float64",
        "losses": LOSSES,
        "loss": {"entropy_coef": entropy, "aggregation": "seq_mean_token_mean"},
        "source": {
            "kind": "model",
            "path": str(path),
            "prompts": PROMPTS,
            "group_size": 2,
            "max_new_tokens": 6,
            "reward": "length",
            "rollout_dtype": "float32",
            "stale": {"steps": 1, "lr": 1e-3, "target_kl": None},
            "shared_prefix": shared_prefix,
        },
        "diagnostics": {"engine": "materialized"},
    }
    if budget_mib is not None:
        cfg["diagnostics"]["memory_budget_mib"] = budget_mib
    return run_compare(validate(cfg))


def gradient_bytes(path) -> int:
    model = load_checkpoint(str(path), torch.device("cpu"), torch.float64).model
    head = model.get_output_embeddings().weight
    return sum(p.numel() * 8 for _, ps in parameter_groups(model) for p in ps) + head.numel() * 8


# The relative difference allowed between two passes over the same batch in float64. On the
# padded grid the passes differ only in the order of their sums (rounding, ~1e-16 per
# operation). With the completions of a prompt packed in one row (source.shared_prefix) against
# one-sequence micro-batches or the padded grid, the products have other shapes: GPT-2 computes
# in float64 throughout, but transformers' LlamaRMSNorm computes in float32 whatever the
# model's dtype, so a packed Llama moves at float32's rounding.
def float64_passes(arch: str, packed: bool) -> float:
    return 1e-6 if packed and arch == "llama" else 1e-10


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("entropy", [0.0, 0.05])
@pytest.mark.parametrize("packed", [False, True])
def test_every_plan_gives_the_same_norms(checkpoints, arch, entropy, packed):
    path = checkpoints[arch]
    one = run(path, entropy=entropy, shared_prefix=packed)
    assert one.model.gradient_pass.micro_batches == 1
    # the stale steps' last forward (same θ, same sequences, one micro-batch) is replayed
    assert one.model.gradient_pass.replayed_forward
    assert one.model.gradient_pass.forwards == 0
    assert one.model.gradient_pass.backwards == len(LOSSES)
    n = one.batch.num_sequences
    # one byte: a micro-batch per sequence, no room for a loss's summed gradient: one loss
    # per forward
    alone = run(path, budget_mib=1e-6, entropy=entropy, shared_prefix=packed)
    plan = alone.model.gradient_pass
    assert plan.micro_batches == n and plan.over_budget
    assert plan.forwards == n * len(LOSSES) and plan.backwards == n * len(LOSSES)
    # room for the summed gradients of two losses and two sequences (s + V·4·k per token, ≤ 6
    # tokens each): some losses share each forward, not all
    per_sequence = plan.bytes_per_sequence + 4 * 3 * 300 * 6
    budget = 2 * gradient_bytes(path) + 2 * per_sequence
    shared = run(path, budget_mib=budget / 2**20, entropy=entropy, shared_prefix=packed)
    splan = shared.model.gradient_pass
    assert 1 < splan.micro_batches < n
    assert splan.micro_batches < splan.forwards < len(LOSSES) * splan.micro_batches
    # packed: the one-forward plan packs each prompt's completions, a sequence alone cannot
    assert one.model.gradient_pass.shared_prefix is packed and not plan.shared_prefix
    rel = float64_passes(arch, packed)
    for report in (alone, shared):
        for name, values in model_grad_norms(report).items():
            for a, b in zip(values, model_grad_norms(one)[name], strict=True):
                assert (a is None) == (b is None)
                if a is not None:
                    assert a == pytest.approx(b, rel=rel), name


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # gpt2: tied embeddings
@pytest.mark.parametrize("packed", [False, True])
def test_the_one_pass_norms_equal_a_plain_autograd_computation(checkpoints, arch, packed):
    # The model's own forward (its logits, not gradlens's hidden-state path) on the padded
    # batch and SFT written out, at the checkpoint's θ (no stale step), all float64: rounding
    # only (`float64_passes`). With tied embeddings the trainer's .grad of the shared tensor
    # sums both paths: the total norm counts it once, and the tied norm is that tensor's.
    path = checkpoints[arch]
    cfg = validate(
        {
            "dtype": "float64",
            "losses": ["sft"],
            "source": {
                "kind": "model",
                "path": str(path),
                "prompts": PROMPTS,
                "group_size": 2,
                "max_new_tokens": 6,
                "rollout_dtype": "float32",
                "stale": {"steps": 0},
                "shared_prefix": packed,
            },
        }
    )
    report = run_compare(cfg)
    from helpers import build_batch

    batch = build_batch(cfg)
    seqs = batch.model_context.sequences
    model = load_checkpoint(str(path), torch.device("cpu"), torch.float64).model
    # SFT by hand in float64 (transformers' own loss upcasts the logits to float32 only)
    logits = model(
        input_ids=seqs.input_ids,
        attention_mask=seqs.attention_mask,
        position_ids=seqs.position_ids,
    ).logits[:, :-1]
    logp = torch.log_softmax(logits, -1).gather(-1, seqs.tokens[..., None])[..., 0]
    (-logp[seqs.loss_mask].mean()).backward()
    expected = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in model.parameters()))
    mg = report.losses[0].model_grads
    assert report.model.gradient_pass.checkpointed  # one block at a time
    assert report.model.gradient_pass.shared_prefix is packed
    rel = float64_passes(arch, packed)
    assert mg is not None and mg.total_norm == pytest.approx(expected, rel=rel)
    if arch == "gpt2":
        shared = model.get_input_embeddings().weight
        assert mg.tied and mg.tied_grad_norm == pytest.approx(float(shared.grad.norm()), rel=1e-10)


@contextmanager
def refuse_in_the_forward(model):
    raise BlockwiseUnsupported("a block argument besides x depends on a parameter")
    yield  # pragma: no cover


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "gpt2", "phi"])
def test_one_block_at_a_time_equals_the_whole_graph(checkpoints, arch, monkeypatch):
    # The same losses through the kept whole graph (no cut at the blocks): every group's norm
    # agrees to rounding, and the tied pair's inner product (held as rows) to the full sum.
    blockwise = run(checkpoints[arch])
    assert blockwise.model.gradient_pass.checkpointed
    if arch == "phi":  # found only in a forward: the stale steps' recording of the last
        # forward finds it (no tape is kept), and so does the taped probe of one sequence
        monkeypatch.setattr("gradlens.sources.staleness.taped_blocks", refuse_in_the_forward)
        monkeypatch.setattr("gradlens.compare.model_grads.taped_blocks", refuse_in_the_forward)
    else:
        monkeypatch.setattr("gradlens.compare.model_grads.cut_blocks", lambda model, ctx: None)
    whole = run(checkpoints[arch])
    assert not whole.model.gradient_pass.checkpointed
    for name, values in model_grad_norms(whole).items():
        for a, b in zip(values, model_grad_norms(blockwise)[name], strict=True):
            assert (a is None) == (b is None)
            if a is not None:
                assert a == pytest.approx(b, rel=1e-10), name


@pytest.mark.slow  # builds and loads a checkpoint: the full suite runs it
def test_the_logit_path_leaf_is_the_batchs_copy_when_it_holds_the_same_values(checkpoints):
    loaded = load_checkpoint(str(checkpoints["llama"]), torch.device("cpu"), torch.float64)
    model = loaded.model
    same = SimpleNamespace(weight=head_weight(model).detach().clone())
    leaf = logit_path_weight(same, model)  # no third copy of W: the batch's own storage
    assert leaf.requires_grad and leaf.is_leaf and not same.weight.requires_grad
    assert leaf.untyped_storage().data_ptr() == same.weight.untyped_storage().data_ptr()
    # a batch whose W differs (another checkpoint's, a rank's rows): a copy of the model's
    other = SimpleNamespace(weight=same.weight + 1.0)
    copy = logit_path_weight(other, model)
    assert copy.untyped_storage().data_ptr() != other.weight.untyped_storage().data_ptr()
    assert torch.equal(copy.detach(), head_weight(model).detach())
    assert copy.untyped_storage().data_ptr() != head_weight(model).untyped_storage().data_ptr()


def test_the_gradients_plan_with_the_stale_steps_measurement_of_a_sequence(
    checkpoints, monkeypatch
):
    # The stale steps measured what one sequence's forward keeps (at θ_0, on these sequences)
    # and recorded the last forward: the gradients' plan takes both, without a probe forward.
    measured = run(checkpoints["llama"])

    def no_probe(*args, **kwargs):
        raise AssertionError("a forward the stale steps had already made")

    monkeypatch.setattr("gradlens.compare.model_grads.probe", no_probe)
    # nor a taped forward: neither cut_blocks' of one sequence nor one for the gradients
    monkeypatch.setattr("gradlens.compare.model_grads.taped_blocks", no_probe)
    reused = run(checkpoints["llama"])
    stale_pass = reused.model.staleness.model_pass
    grads_pass = reused.model.gradient_pass
    assert grads_pass.checkpointed and stale_pass.checkpointed
    assert grads_pass.bytes_per_sequence == stale_pass.bytes_per_sequence
    assert grads_pass == measured.model.gradient_pass
    assert model_grad_norms(reused) == model_grad_norms(measured)
