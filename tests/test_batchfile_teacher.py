"""A distillation teacher in a rollout batch file (gradlens.batchfile's ``teacher_*`` keys): a
batch with a teacher written and read back gives the same teacher and the same report, in every
format and teacher form; a malformed teacher is refused naming its key (exit 2)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from helpers import random_batch, with_teacher
from typer.testing import CliRunner

from gradlens.batchfile import read_batch_tensors, write_batch
from gradlens.cli import app
from gradlens.compare.run import compare_batch, resolve_device, run_compare
from gradlens.config import build_config
from gradlens.containers import Batch, Teacher
from gradlens.sources.batch import dump_tensors

runner = CliRunner()
SEED = 21
# float64 batch in, float64 back: .safetensors and .pt store the bits, .jsonl the shortest
# decimal text of each double, which parses back exactly.
F64_SET = ["dtype=float64", "losses=[reinforce, ppo_clip, opd]"]


def teacher_batch(form: str) -> Batch:
    """A float64 batch whose teacher is a hidden/weight pair with a bias (``pair``), its
    logits (``logits``) or stored top-k ids and log-probs (``topk``); log q(y) in each."""
    batch = with_teacher(random_batch(SEED, n=4, t=5, v=13, h=6, drift=0.4), SEED, k=4)
    teacher = batch.teacher
    assert teacher is not None and teacher.hidden is not None and teacher.weight is not None
    bias = torch.linspace(-0.5, 0.5, 13, dtype=torch.float64)
    logits = teacher.hidden @ teacher.weight.T + bias  # [N, T, V]
    if form == "pair":
        teacher = dataclasses.replace(teacher, bias=bias)
    elif form == "logits":
        teacher = Teacher(logits=logits, sampled_logp=teacher.sampled_logp)
    else:
        top = torch.topk(torch.log_softmax(logits, -1), 4, dim=-1)
        teacher = Teacher(topk_ids=top.indices, topk_logp=top.values)
    return dataclasses.replace(batch, teacher=teacher)


def overrides(form: str, *extra: str) -> list[str]:
    kind = "top_k" if form == "topk" else "full"
    return [*F64_SET, f"loss.distill.form={kind}", "loss.distill.divergence=jsd", *extra]


@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".jsonl"])
@pytest.mark.parametrize("form", ["pair", "logits", "topk"])
def test_written_teacher_reads_back_the_same(tmp_path: Path, suffix: str, form: str) -> None:
    batch = teacher_batch(form)
    path = tmp_path / f"batch{suffix}"
    write_batch(path, dump_tensors(batch))
    data = read_batch_tensors(path)
    assert batch.teacher is not None
    stored = {
        "teacher_hidden": batch.teacher.hidden,
        "teacher_weight": batch.teacher.weight,
        "teacher_bias": batch.teacher.bias,
        "teacher_logits": batch.teacher.logits,
        "teacher_topk_ids": batch.teacher.topk_ids,
        "teacher_topk_logp": batch.teacher.topk_logp,
        "teacher_logp": batch.teacher.sampled_logp,
    }
    mask = batch.mask
    for key, x in stored.items():
        if x is None:
            assert key not in data, key
            continue
        got = data[key]
        if x.dim() >= 2 and x.shape[:2] == mask.shape:  # per token: compare the valid tokens
            width = got.shape[1]  # .jsonl: as long as the longest sequence
            x, got = x[:, :width][mask[:, :width]], got[mask[:, :width]]
        assert torch.equal(got.to(x.dtype), x), key

    config = build_config(None, overrides(form))
    direct = compare_batch(batch, config, resolve_device("cpu"))
    read = run_compare(build_config(None, [*overrides(form), f"source.path={path}"]))
    assert read.passed and direct.passed
    for a, b in zip(read.losses, direct.losses, strict=True):
        # the same float64 values; a .jsonl grid is only as wide as the longest sequence, so
        # its sums run over fewer padded columns in another order: a few ulps (1e-16 each)
        assert a.loss == pytest.approx(b.loss, rel=1e-13)
        assert a.rows.total_norm == pytest.approx(b.rows.total_norm, rel=1e-13)
        assert a.zero_sum.passed


def test_dump_writes_the_teacher_and_compare_reads_it(tmp_path: Path) -> None:
    # The CLI round trip: a synthetic batch with a perturbed teacher, dumped and compared, gives
    # the report of the synthetic batch itself (float64: the file stores the same tensors).
    small = [
        "source.vocab_size=64",
        "source.num_sequences=4",
        "source.min_length=2",
        "source.max_length=8",
    ]
    run = [*F64_SET, "loss.distill.divergence=reverse_kl"]
    synthetic = [*run, *small, "source.teacher=perturbed"]
    path = tmp_path / "batch.safetensors"
    dumped = runner.invoke(app, ["dump", "-o", str(path), *sets(synthetic)])
    assert dumped.exit_code == 0, dumped.output
    assert {"teacher_hidden", "teacher_weight", "teacher_logp"} <= set(read_batch_tensors(path))
    direct = runner.invoke(app, ["compare", "-f", "json", "--check", *sets(synthetic)])
    read = runner.invoke(
        app, ["compare", "-f", "json", "--check", *sets([*run, f"source.path={path}"])]
    )
    assert direct.exit_code == 0 and read.exit_code == 0, read.output
    a, b = json.loads(direct.stdout), json.loads(read.stdout)
    for x, y in zip(a["losses"], b["losses"], strict=True):
        # the same float64 values; the file's tensors are fresh copies whose products and sums
        # may round in another order (seen: 1 ulp of the loss); 1e-13 is a few ulps, while a
        # teacher read wrongly changes the loss at O(1)
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-13)
        assert x["rows"]["total_norm"] == pytest.approx(y["rows"]["total_norm"], rel=1e-13)
        assert x["zero_sum"]["passed"] and y["zero_sum"]["passed"]  # the term is zero-sum
    assert a["passed"] and b["passed"]


def sets(settings: list[str]) -> list[str]:
    return [a for s in settings for a in ("--set", s)]


def bad(tmp_path: Path, change: dict[str, torch.Tensor], *sets: str) -> str:
    batch = teacher_batch("topk")
    tensors = {**dump_tensors(batch), **change}
    write_batch(tmp_path / "bad.pt", tensors)
    args = [a for s in (*overrides("topk"), *sets) for a in ("--set", s)]
    result = runner.invoke(
        app, ["compare", "--check", *args, "--set", f"source.path={tmp_path / 'bad.pt'}"]
    )
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    return result.stderr


def test_malformed_teachers_are_refused_naming_the_key(tmp_path: Path) -> None:
    batch = teacher_batch("topk")
    assert batch.teacher is not None and batch.teacher.topk_ids is not None
    ids, logp = batch.teacher.topk_ids.clone(), batch.teacher.topk_logp
    assert logp is not None
    # sequence 0 has a token in the loss at position 0 (random_batch: every length ≥ 1)
    out_of_range, repeated = ids.clone(), ids.clone()
    out_of_range[0, 0, 1] = 13  # V = 13: ids run 0 … 12
    repeated[0, 0, 2] = repeated[0, 0, 0]
    positive, nan = logp.clone(), logp.clone()
    positive[0, 0, 3] = 0.5
    nan[0, 0, 0] = float("nan")
    cases = [
        ({"teacher_topk_ids": out_of_range}, "'teacher_topk_ids'[0, 0, 1]: token id 13 is outside"),
        ({"teacher_topk_ids": repeated}, "appears twice in this position's top-k"),
        # ids stored as floats (as a .jsonl file stores them) must be whole numbers
        ({"teacher_topk_ids": ids.double() + 0.5}, "'teacher_topk_ids'[0, 0, 0] is 1.5, not a"),
        ({"teacher_topk_logp": positive}, "'teacher_topk_logp'[0, 0, 3]: log-probability 0.5 > 0"),
        ({"teacher_topk_logp": nan}, "'teacher_topk_logp'[0, 0, 0]: NaN at a position in the"),
        ({"teacher_topk_logp": logp[..., :2]}, "like teacher_topk_ids"),
        ({"teacher_logp": torch.zeros(4, 3)}, "'teacher_logp': has shape (4, 3)"),
        ({"teacher_weight": torch.zeros(12, 3)}, "given without teacher_hidden"),
        (
            {"teacher_hidden": torch.zeros(4, 5, 3), "teacher_weight": torch.zeros(12, 3)},
            "'teacher_weight': has shape (12, 3); expected [V, H'] = (13, 3)",
        ),
    ]
    for change, expected in cases:
        message = bad(tmp_path, change)
        assert expected in message, (expected, message)
    # a file with stored top-k only cannot give the full form: refused before any work
    assert "form: 'full' needs the teacher's whole distribution" in bad(
        tmp_path, {}, "loss.distill.form=full"
    )


@pytest.mark.parametrize("form", ["logits", "pair"])
def test_opd_takes_log_q_y_from_a_teachers_whole_distribution(tmp_path: Path, form: str) -> None:
    # a file with the teacher's logits (or hidden/weight pair) but no teacher_logp: opd's
    # log q(y) is read off that distribution, as the other sources do, not replaced by ℓ_old
    gen = torch.Generator().manual_seed(3)
    n, t, v, h = 2, 3, 5, 4
    tokens = torch.tensor([[0, 1, 2], [3, 4, 0]])
    data = {
        "responses": tokens,
        "response_mask": torch.ones(n, t),
        "old_log_probs": -torch.rand(n, t, generator=gen) - 0.1,
        "advantages": torch.tensor([1.0, -1.0]),
        "hidden_states": torch.randn(n, t, h, generator=gen),
        "lm_head_weight": torch.randn(v, h, generator=gen),
    }
    if form == "logits":
        teacher = {"teacher_logits": torch.randn(n, t, v, generator=gen)}
        logits = teacher["teacher_logits"].double()
    else:
        teacher = {
            "teacher_hidden": torch.randn(n, t, 3, generator=gen),
            "teacher_weight": torch.randn(v, 3, generator=gen),
            "teacher_bias": torch.randn(v, generator=gen),
        }
        logits = (
            teacher["teacher_hidden"].double() @ teacher["teacher_weight"].double().T
            + teacher["teacher_bias"].double()
        )
    log_q_y = torch.log_softmax(logits, -1).gather(-1, tokens[..., None]).squeeze(-1)
    torch.save({**data, **teacher}, tmp_path / "whole.pt")
    torch.save({**data, **teacher, "teacher_logp": log_q_y.float()}, tmp_path / "given.pt")
    reports = []
    for name in ("whole.pt", "given.pt"):
        result = runner.invoke(
            app, ["compare", "-l", "opd", "-f", "json", "--set", f"source.path={tmp_path / name}"]
        )
        assert result.exit_code == 0, result.output
        assert "log q(y) := ℓ_old" not in result.stdout  # no stand-in for log q(y)
        reports.append(json.loads(result.stdout)["losses"][0])
    whole, given = reports
    assert whole["rows"]["total_norm"] == pytest.approx(given["rows"]["total_norm"], rel=1e-6)
