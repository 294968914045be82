"""A second checkpoint as the model source's distillation teacher (``source.teacher_path``,
gradlens.sources.teacher_model): two tiny random Llamas of different seeds (tests/
tiny_checkpoints.py); the teacher's log q(y) against transformers' own logits; the student as
its own teacher gives a zero forward KL; ``--check`` passes with the term in both engines; a
teacher of another vocabulary, or of a context too short for the sequences, is refused naming
the key; a dump carries the teacher."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from gradlens.batchfile import read_batch_tensors
from gradlens.cli import app
from gradlens.compare import run_compare
from gradlens.compare.run import source_context
from gradlens.config import validate
from gradlens.containers import Batch
from gradlens.sources import build_source
from gradlens.sources import model as model_source

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
pytestmark = pytest.mark.slow  # two checkpoints built for the module (tests/conftest.py)

from tiny_checkpoints import VOCAB, save_checkpoint, save_instruct_checkpoint  # noqa: E402

runner = CliRunner()
PROMPTS = ["def add(a, b):\n", "import os\n"]
T = 0.8  # a temperature ≠ 1: the teacher's logits are divided by it too


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("teacher")
    return {
        "student": save_checkpoint(root / "student", "llama", seed=0),
        "teacher": save_checkpoint(root / "teacher", "llama", seed=1),
    }


def config(student: Path, teacher: Path | str, *losses: str, **loss: object) -> dict:
    return {
        "dtype": "float64",
        "losses": list(losses) or ["reinforce", "opd"],
        "loss": {"distill": {"divergence": "forward_kl"}, **loss},
        "source": {
            "kind": "model",
            "path": str(student),
            "teacher_path": str(teacher),
            "prompts": PROMPTS,
            "group_size": 2,
            "max_new_tokens": 6,
            "temperature": T,
            "reward": "length",
            "rollout_dtype": "float32",
            "stale": {"steps": 0},
        },
    }


def batch_of(cfg: dict) -> Batch:
    c = validate(cfg)
    return build_source(c.source, source_context(c, torch.device("cpu")))


def test_the_teachers_log_probs_are_its_own_logits_over_t(checkpoints: dict[str, Path]) -> None:
    batch = batch_of(config(checkpoints["student"], checkpoints["teacher"]))
    teacher = batch.teacher
    assert teacher is not None and teacher.sampled_logp is not None
    assert teacher.hidden is not None and teacher.weight is not None
    assert teacher.hidden.shape[:2] == batch.mask.shape
    context = batch.model_context
    assert context is not None
    seqs = context.sequences
    model = transformers.AutoModelForCausalLM.from_pretrained(
        checkpoints["teacher"], dtype=torch.float64
    ).eval()
    with torch.no_grad():
        logits = model(
            input_ids=seqs.input_ids,
            attention_mask=seqs.attention_mask,
            position_ids=seqs.position_ids,
        ).logits[:, :-1]  # [N, L − 1, V]: position t predicts token t + 1
    expected = torch.log_softmax(logits / T, -1).gather(-1, batch.tokens[..., None])[..., 0]
    m = batch.mask
    # float64 both; transformers' lm_head vs gradlens's W'·(h'/T): the same products in
    # another order, ~1e-15 relative on log-probs of a few nats
    torch.testing.assert_close(teacher.sampled_logp[m], expected[m], rtol=1e-12, atol=1e-12)
    # a different seed: a different distribution, by far more than rounding
    assert float((teacher.sampled_logp[m] - batch.old_logp[m]).abs().max()) > 1e-2


def test_the_student_as_its_own_teacher_has_zero_forward_kl(checkpoints: dict[str, Path]) -> None:
    # q = π exactly (the same checkpoint, the same pass): KL(q‖π) = 0 and its gradient π − q = 0,
    # so every loss's gradient is its policy gradient alone (reinforce: c = −A)
    cfg = config(checkpoints["student"], checkpoints["student"], "reinforce")
    with_term = run_compare(validate(cfg))
    cfg["loss"] = {}
    without = run_compare(validate(cfg))
    assert with_term.passed
    a, b = with_term.losses[0], without.losses[0]
    assert a.loss == pytest.approx(b.loss, abs=1e-12)
    assert a.rows.total_norm == pytest.approx(b.rows.total_norm, rel=1e-10)


@pytest.mark.parametrize("budget_mib", [None, 0.05], ids=["one_pass", "micro_batches"])
def test_the_whole_models_lm_head_gradient_carries_the_term(
    checkpoints: dict[str, Path], budget_mib: float | None
) -> None:
    # The whole-model backward differentiates the same objective, the distillation term
    # included: its lm_head group is the lm_head diagnostic's ‖∂L/∂W‖ (float64: the two sum
    # the same products in another order, ~1e-15; 1e-9 leaves room, the term is O(1) of it).
    # A budget of 0.05 MiB splits the batch into micro-batches (one sequence each).
    cfg = config(checkpoints["student"], checkpoints["teacher"], "reinforce", "ppo_clip")
    # two random models are both near uniform over 300 tokens: λ = 50 makes the term's share
    # of the gradient visible
    cfg["loss"]["distill"] = {"divergence": "reverse_kl", "coef": 50.0}
    if budget_mib is not None:
        cfg["diagnostics"] = {"memory_budget_mib": budget_mib}
    report = run_compare(validate(cfg))
    cfg["loss"] = {}
    bare = run_compare(validate(cfg))
    assert report.model is not None and report.model.gradient_pass is not None
    assert (report.model.gradient_pass.micro_batches > 1) == (budget_mib is not None)
    for r, b in zip(report.losses, bare.losses, strict=True):
        mg = r.model_grads
        assert mg is not None and not mg.tied
        lm_head = next(g.norm for g in mg.groups if g.name == "lm_head")
        assert lm_head == pytest.approx(r.rows.total_norm, rel=1e-9)
        assert abs(r.rows.total_norm - b.rows.total_norm) > 1e-2 * b.rows.total_norm


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["materialized", "streamed"])
def test_check_passes_with_a_checkpoint_teacher(
    checkpoints: dict[str, Path], engine: str, tmp_path: Path
) -> None:
    cfg = config(checkpoints["student"], checkpoints["teacher"], "ppo_clip", "opd")
    cfg["loss"]["distill"] = {"divergence": "jsd", "beta": 0.5}
    cfg["diagnostics"] = {"engine": engine}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    result = runner.invoke(app, ["compare", "--check", "-c", str(path), "-f", "json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert f"teacher {checkpoints['teacher']}" in report["batch"]["source"]
    for loss in report["losses"]:
        assert loss["zero_sum"]["passed"] and loss["agreement"]["passed"], loss["name"]


def test_a_teacher_of_another_vocabulary_is_refused(
    checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    other = save_checkpoint(tmp_path / "wide", "llama", tiled=(2 * VOCAB, 1.0), seed=1)
    with pytest.raises(Exception, match=r"source\.teacher_path: .* does not share the student"):
        batch_of(config(checkpoints["student"], other))
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config(checkpoints["student"], other)))
    result = runner.invoke(app, ["compare", "-c", str(path)])
    assert result.exit_code == 2
    assert f"lm_head has {2 * VOCAB} rows and the student's {VOCAB}" in result.stderr


def test_a_teacher_whose_tokenizer_maps_tokens_to_other_ids_is_refused(
    checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    # the instruct tokenizer has the student's size, but its special tokens shift the ids:
    # the two distributions would be compared entry by entry over different tokens
    other = save_instruct_checkpoint(tmp_path / "instruct")
    with pytest.raises(
        Exception, match=r"does not share the student's vocabulary: its tokenizer gives \d+ of"
    ):
        batch_of(config(checkpoints["student"], other))


def test_a_teacher_whose_context_is_too_short_is_refused_before_the_rollout(
    checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    """GPT-2's position table has ``context`` rows: without the check, the teacher's forward
    indexed past it (an IndexError, exit 3, after the rollout and the stale steps)."""
    short = save_checkpoint(tmp_path / "short", "gpt2", context=8, seed=1)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config(checkpoints["student"], short)))
    result = runner.invoke(app, ["compare", "-c", str(path)])
    assert result.exit_code == 2, result.output
    assert f"source.teacher_path: the context of {short} (max_position_embeddings) is 8" in (
        result.stderr
    )
    assert "with source.max_new_tokens = 6 needs" in result.stderr
    assert "sampling" not in result.stderr  # refused before the rollout


def test_a_teacher_context_unreadable_before_the_rollout_is_checked_once_loaded(
    checkpoints: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the config cannot be read before the rollout, the loaded teacher's context is
    checked against the sequences sampled."""
    short = save_checkpoint(tmp_path / "short", "gpt2", context=8, seed=1)
    monkeypatch.setattr(model_source, "checkpoint_sizes", lambda path: None)
    with pytest.raises(
        Exception,
        match=r"source\.teacher_path: the context of .* is 8 positions, "
        r"but sequence \d+ \(prompt \+ completion\) needs \d+",
    ):
        batch_of(config(checkpoints["student"], short))


@pytest.mark.slow
def test_a_dump_of_the_model_source_carries_the_teacher(
    checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    cfg = config(checkpoints["student"], checkpoints["teacher"])
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    out = tmp_path / "batch.safetensors"
    dumped = runner.invoke(app, ["dump", "-c", str(path), "-o", str(out)])
    assert dumped.exit_code == 0, dumped.output
    data = read_batch_tensors(out)
    batch = batch_of(cfg)
    assert batch.teacher is not None and batch.teacher.sampled_logp is not None
    # the file holds the completion's columns: its tokens in the loss are the batch's, in order
    m = data["mask"]
    assert torch.equal(data["teacher_logp"][m], batch.teacher.sampled_logp[batch.mask])
    assert data["teacher_hidden"].shape[:2] == m.shape


def test_the_teachers_forward_packs_after_its_own_check(
    checkpoints: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    import gradlens.sources.teacher_model as teacher_model

    checked = []

    def refused(model: object, seqs: object) -> tuple[object, str]:
        checked.append(model)
        return seqs, "its forward ignores the 4D mask"

    packed = batch_of(config(checkpoints["student"], checkpoints["teacher"]))
    monkeypatch.setattr(teacher_model, "with_shared_prefix", refused)
    padded = batch_of(config(checkpoints["student"], checkpoints["teacher"]))
    assert len(checked) == 1 and checked[0] is not padded.model_context.loaded.model
    notes = padded.model_context.notes
    assert any("teacher's forward went through padded: its forward ignores" in n for n in notes)
    assert not any("teacher" in n for n in packed.model_context.notes)
    # the packed teacher and the padded one: the same log-probs up to rounding (float64)
    m = packed.mask
    assert packed.teacher is not None and padded.teacher is not None
    assert packed.teacher.sampled_logp is not None and padded.teacher.sampled_logp is not None
    torch.testing.assert_close(
        packed.teacher.sampled_logp[m], padded.teacher.sampled_logp[m], rtol=1e-12, atol=1e-12
    )
