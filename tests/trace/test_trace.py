"""`gradlens trace`, the spike rules and the contributors, on a hand-made run directory.

The run: a metrics JSONL of 8 steps whose grad_norm is flat (1.0, 1.1, 0.9, ...) but for
step 6 (20.0), batch files for steps 3 and 6 (random float64 batches, with sidecars), and one
file that is not a batch file at all.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from gradlens.batchfile import write_batch
from gradlens.cli import app
from gradlens.containers import Batch
from gradlens.diagnostics.contributors import token_grad_norms
from gradlens.diagnostics.spikes import mad_scores, ratio_spike
from gradlens.grads import objective, softmax_view
from gradlens.losses import Aggregation, LossParams, get_loss
from gradlens.sources.batch import dump_tensors
from gradlens.sources.checkpoint import load_tokenizer
from gradlens.sources.tokenizer_digest import vocabulary_sha256
from gradlens.trace.run import TraceSettings, trace_run
from tests.helpers import random_batch

F64 = torch.float64
GRAD_NORMS = [1.0, 1.1, 0.9, 1.05, 0.95, 20.0, 1.0, 1.02]
runner = CliRunner()


def test_mad_scores_by_hand() -> None:
    # step 3 (index 3): history 1.0, 1.1, 0.9 → median 1.0, |x − m| = 0, 0.1, 0.1 → MAD 0.1,
    # scale 1.4826·0.1 = 0.14826; x = 1.05 → z = 0.05/0.14826 = 0.3372
    scores = mad_scores(GRAD_NORMS, window=20, threshold=5.0, min_history=3)
    assert [s.median for s in scores[:3]] == [None, None, None]
    assert scores[3].z == pytest.approx(0.05 / 0.14826, rel=1e-12)
    # step 6 (index 5): history 1.0, 1.1, 0.9, 1.05, 0.95 → median 1.0, deviations
    # 0, .1, .1, .05, .05 → MAD 0.05, scale 0.07413; z = 19/0.07413 = 256.3
    assert scores[5].z == pytest.approx(19.0 / (1.4826 * 0.05), rel=1e-12)
    assert [s.spike for s in scores] == [False] * 5 + [True, False, False]
    # the spike does not lift the baseline: index 6's median is still 1.0 (the 6 values'
    # median: sorted .9 .95 1 1.05 1.1 20 → (1 + 1.05)/2 = 1.025)
    assert scores[6].median == pytest.approx(1.025)
    # a flat history: MAD 0, the 1 % floor: 1.0 → 1.005 is z = 0.5, not a spike
    flat = mad_scores([1.0, 1.0, 1.0, 1.005], min_history=3)
    assert flat[3].z == pytest.approx(0.5) and not flat[3].spike
    assert ratio_spike(3.1, [1.0, 1.0], 3.0, 2) and not ratio_spike(2.9, [1.0, 1.0], 3.0, 2)
    assert not ratio_spike(100.0, [1.0], 3.0, 2)  # too little history


def test_token_grad_norms_are_autograds_through_the_logits() -> None:
    # ‖∂L/∂z_t‖ from c_t, π_y and Σπ² against autograd of the whole loss through the logits
    batch = random_batch(5)
    view = softmax_view(batch)
    spec, params, agg = get_loss("ppo_clip"), LossParams(), Aggregation("token_mean")
    obj = objective(batch, view.logp, spec, params, agg)
    c = obj.coefficient[view.rows, view.cols]
    norms = token_grad_norms(c, view.sampled_probs, (view.probs**2).sum(-1))
    z = (batch.hidden @ batch.weight.T).detach().requires_grad_(True)  # [N, T, V] float64
    logp = torch.log_softmax(z, -1).gather(-1, batch.tokens[..., None])[..., 0]
    loss = objective(batch, logp, spec, params, agg).loss
    (gz,) = torch.autograd.grad(loss, z)
    expected = gz.norm(dim=-1)[view.rows, view.cols]
    # float64, V = 11: the closed form and the norm of autograd's vector agree to rounding
    assert float((norms - expected).abs().max()) <= 1e-14 * float(expected.max())
    assert float(expected.max()) > 0


def dumpable_batch(seed: int) -> Batch:
    """``random_batch`` with its old log-probs clamped to ≤ 0: its log-ratio noise can push a
    log-probability above 0, which batch-file validation rightly refuses."""
    batch = random_batch(seed)
    return dataclasses.replace(batch, old_logp=batch.old_logp.clamp(max=0.0))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run")
    with (out / "metrics.jsonl").open("w") as fh:
        for step, norm in enumerate(GRAD_NORMS, start=1):
            fh.write(json.dumps({"step": step, "grad_norm": norm, "spike": False}) + "\n")
    for step, seed in ((3, 1), (6, 2)):
        write_batch(out / f"step_{step:06d}.safetensors", dump_tensors(dumpable_batch(seed)))
        side = {"step": step, "losses": ["ppo_clip", "reinforce"], "loss": {"eps_high": 0.28}}
        (out / f"step_{step:06d}.json").write_text(json.dumps(side))
    (out / "step_000007.safetensors").write_bytes(b"not a safetensors file")
    return out


def test_trace_reads_the_run_and_explains_the_spike(run_dir: Path) -> None:
    trace = trace_run(str(run_dir), TraceSettings(top_k=3))
    assert [s.step for s in trace.steps] == list(range(1, 9))
    assert trace.series == "grad_norm"
    assert [s.step for s in trace.steps if s.spike] == [6]
    # the batch files' diagnoses fill their steps' columns, the other steps only have grad_norm
    labels = {c.key: c.label for c in trace.columns}
    assert labels["gradlens/ppo_clip/lm_head_norm"] == "ppo_clip ‖∂L/∂W‖"
    by_step = {s.step: s for s in trace.steps}
    assert by_step[3].values["gradlens/ppo_clip/lm_head_norm"] is not None
    assert by_step[4].values["gradlens/ppo_clip/lm_head_norm"] is None
    assert by_step[6].batch_file == "step_000006.safetensors"
    # the bad file: named, skipped, the rest traced
    assert [b.name for b in trace.bad_files] == ["step_000007.safetensors"]
    (spike,) = trace.spikes
    assert spike.step == 6 and spike.loss == "ppo_clip" and spike.value == 20.0
    assert len(spike.tokens) == 3 and len(spike.sequences) == 3
    shares = [t.share for t in spike.tokens]
    assert shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 1
    # the top token's norm is the largest of the batch's, recomputed here
    batch = dumpable_batch(2)
    view = softmax_view(batch)
    obj = objective(batch, view.logp, get_loss("ppo_clip"), LossParams(), Aggregation())
    c = obj.coefficient[view.rows, view.cols]
    norms = token_grad_norms(c, view.sampled_probs, (view.probs**2).sum(-1))
    assert spike.tokens[0].grad_norm == pytest.approx(float(norms.max()), rel=1e-6)


@pytest.mark.slow
def test_cli_formats(run_dir: Path, tmp_path: Path) -> None:
    png = tmp_path / "trace.png"
    table = runner.invoke(app, ["trace", str(run_dir), "--plot", str(png)])
    assert table.exit_code == 0, table.output
    assert "SPIKE" in table.output and "skipped step_000007.safetensors" in table.output
    assert png.stat().st_size > 10_000
    doc = json.loads(runner.invoke(app, ["trace", str(run_dir), "--format", "json"]).stdout)
    assert doc["schema_version"] == "gradlens.trace/1" and doc["spikes"][0]["step"] == 6
    lines = runner.invoke(app, ["trace", str(run_dir), "--format", "jsonl"]).stdout.splitlines()
    assert [json.loads(x)["step"] for x in lines] == list(range(1, 9))
    rows = list(
        csv.DictReader(
            io.StringIO(runner.invoke(app, ["trace", str(run_dir), "--format", "csv"]).stdout)
        )
    )
    assert rows[5]["spike"] == "True" and float(rows[5]["grad_norm"]) == 20.0
    # a glob of batch files alone: ordered by their sidecars' steps, no grad_norm → lm_head norm
    glob = runner.invoke(app, ["trace", str(run_dir / "step_*.safetensors"), "--format", "jsonl"])
    assert glob.exit_code == 0
    assert [json.loads(x)["step"] for x in glob.stdout.splitlines()] == [3, 6]


def test_nothing_to_trace_is_a_clear_error(tmp_path: Path) -> None:
    result = runner.invoke(app, ["trace", str(tmp_path / "nothing*")])
    assert result.exit_code != 0 and "DIR_OR_GLOB: nothing at" in result.output


def test_a_run_whose_every_file_is_skipped_is_exit_2_with_the_reasons(tmp_path: Path) -> None:
    # before: exit 0 and an empty table; a step written 1e400 (JSON's inf) was exit 3
    (tmp_path / "metrics.jsonl").write_text(
        '{"step": 1e400, "grad_norm": 1.0}\n{"step": 2.5, "grad_norm": 1.0}\n{"step": true}\n'
    )
    (tmp_path / "step_1.pt").write_bytes(b"not a torch file")
    result = runner.invoke(app, ["trace", str(tmp_path)])
    assert result.exit_code == 2, result.output
    assert "nothing in" in result.stderr and "could be traced" in result.stderr
    assert "metrics.jsonl:1: not a metrics line: 'step' is inf, not a whole number" in (
        result.stderr
    )
    # one good line is enough: the bad ones are named and skipped
    with (tmp_path / "metrics.jsonl").open("a") as fh:
        fh.write('{"step": 3, "grad_norm": 2.0}\n')
    result = runner.invoke(app, ["trace", str(tmp_path), "--format", "json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert [s["step"] for s in doc["steps"]] == [3]
    assert {b["name"] for b in doc["bad_files"]} >= {"metrics.jsonl:1", "metrics.jsonl:2"}


@pytest.mark.parametrize(
    ("option", "expected"),
    [
        (["--losses", "nope"], "unknown loss 'nope'"),
        (["--losses", "ppo,ppo"], "a loss is named twice"),
        (["--tokenizer", "/no/such/tokenizer"], "--tokenizer: '/no/such/tokenizer' is not a"),
    ],
)
def test_a_bad_option_is_refused_before_any_file_is_read(
    run_dir: Path, option: list[str], expected: str
) -> None:
    result = runner.invoke(app, ["trace", str(run_dir), *option])
    assert result.exit_code == 2, result.output
    assert expected in result.stderr


def test_a_value_that_is_not_finite_is_a_spike_and_a_missing_one_is_not() -> None:
    # a NaN or inf gradient norm: the run diverged or the step overflowed, whatever the history
    scores = mad_scores([math.nan, 1.0, 1.1, 0.9, math.inf, None, 1.0], min_history=3)
    assert [s.spike for s in scores] == [True, False, False, False, True, False, False]
    assert scores[4].z is None and scores[4].median == 1.0
    assert scores[6].median == 1.0  # neither entered the history


def test_the_trace_reports_what_it_cannot_place_or_read(tmp_path: Path) -> None:
    lines = [{"step": s, "grad_norm": 1.0 + 0.01 * s} for s in range(1, 8)]
    lines[5]["grad_norm"] = math.inf
    lines[6]["grad_norm"] = "50"  # a string: left out, and said so
    (tmp_path / "metrics.jsonl").write_text(
        "".join(json.dumps(line) + "\n" for line in lines) + "[1, 2]\n"
    )
    batch = dump_tensors(dumpable_batch(1))
    write_batch(tmp_path / "step_3.safetensors", batch)
    write_batch(tmp_path / "other3.safetensors", batch)  # a second file at step 3
    write_batch(tmp_path / "extra.safetensors", batch)
    (tmp_path / "extra.json").write_text(json.dumps({"step": True}))  # no step 1
    trace = trace_run(str(tmp_path))
    bad = {b.name: b.error for b in trace.bad_files}
    assert "already has other3.safetensors" in bad["step_3.safetensors"]
    assert bad["metrics.jsonl:7"] == "'grad_norm' is \"50\", not a number: left out"
    assert bad["metrics.jsonl:8"] == "not a metrics line: a JSON array, not an object"
    steps = {s.step: s for s in trace.steps}
    assert steps[3].batch_file == "other3.safetensors" and steps[6].spike and steps[6].z is None
    assert steps[8].batch_file == "extra.safetensors" and steps[1].batch_file is None
    assert [s.step for s in trace.spikes] == [6] and trace.spikes[0].value is None
    result = runner.invoke(app, ["trace", str(tmp_path), "--format", "jsonl"])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.stdout.splitlines()]  # JSON: no Infinity
    assert records[5]["grad_norm"] is None and records[5]["spike"] is True
    table = runner.invoke(app, ["trace", str(tmp_path)])
    assert "grad_norm is not finite (NaN or inf)" in table.stdout


@pytest.mark.parametrize(
    ("args", "expected"),
    [([""], "DIR_OR_GLOB is empty"), (["run", "--losses", " , "], "names no loss")],
)
def test_empty_arguments_are_refused_not_read_as_defaults(args, expected) -> None:
    # '' would trace the current directory, --losses '' the default losses
    result = runner.invoke(app, ["trace", *args])
    assert result.exit_code == 2 and expected in result.stderr, result.output


@pytest.mark.parametrize("value", ["nan", "inf", "-1"])
def test_a_threshold_that_is_not_a_finite_number_at_least_0_is_refused_as_such(tmp_path, value):
    result = CliRunner().invoke(app, ["trace", str(tmp_path), "--threshold", value])
    assert result.exit_code == 2
    assert "is not a finite number ≥ 0" in result.output  # not "should be ≥ 0" for NaN


def test_metrics_a_reader_cannot_take_are_reported_not_a_crash(tmp_path: Path) -> None:
    text = "".join(json.dumps({"step": s, "grad_norm": 1.0 + 0.01 * s}) + "\n" for s in (1, 2, 3))
    text += '{"step": 4, "grad_norm": 1' + "0" * 400 + "}\n"  # an integer beyond a float
    text += json.dumps({"step": 2, "grad_norm": 50.0}) + "\n"  # step 2 again, another value
    text += json.dumps({"step": 2, "grad_norm": 1.02, "lr": 1e-6}) + "\n"  # the same, and more
    (tmp_path / "metrics.jsonl").write_text(text)
    (tmp_path / "more.jsonl").write_text(json.dumps({"step": 3, "grad_norm": 9.0}) + "\n")
    trace = trace_run(str(tmp_path))
    bad = {b.name: b.error for b in trace.bad_files}
    assert bad["metrics.jsonl:4"] == "'grad_norm' is beyond a float: left out"
    assert bad["metrics.jsonl:5"].startswith("'grad_norm' at step 2 is 50.0 here and 1.02 before")
    assert "metrics.jsonl:6" not in bad  # a repeated value is no conflict
    assert bad["more.jsonl"].startswith("'grad_norm' at step 3 is 9.0 here and 1.03 before")
    steps = {s.step: s.values for s in trace.steps}
    assert steps[2]["grad_norm"] == 1.02 and steps[3]["grad_norm"] == 1.03  # the first kept
    # a metrics file that is not UTF-8: named and skipped, exit 2 when nothing else is left
    (tmp_path / "metrics.jsonl").write_bytes(b'{"step": 1, "grad_norm": 1, "note": "\xff"}\n')
    (tmp_path / "more.jsonl").unlink()
    result = runner.invoke(app, ["trace", str(tmp_path)])
    assert result.exit_code == 2 and "metrics.jsonl: not a metrics file" in result.output
    (tmp_path / "metrics.jsonl").write_text("")
    result = runner.invoke(app, ["trace", str(tmp_path)])
    assert result.exit_code == 2 and "hold no line and it has no batch file" in result.output


def test_without_grad_norm_the_series_is_the_first_losss_lm_head_norm(tmp_path: Path) -> None:
    for step in range(1, 5):
        write_batch(tmp_path / f"step_{step}.safetensors", dump_tensors(dumpable_batch(step)))
    # reinforce first: its column sorts after ppo_clip's, which must not decide the series
    trace = trace_run(str(tmp_path), TraceSettings(losses=("reinforce", "ppo_clip")))
    assert trace.series == "gradlens/reinforce/lm_head_norm"


def test_a_sidecar_setting_of_the_wrong_type_is_named_with_the_sidecar(tmp_path: Path) -> None:
    batch = dump_tensors(dumpable_batch(1))
    for name, side in [("a", {"losses": "ppo_clip"}), ("b", {"loss": [1, 2]})]:
        write_batch(tmp_path / f"{name}.safetensors", batch)
        (tmp_path / f"{name}.json").write_text(json.dumps(side))
    write_batch(tmp_path / "c.safetensors", batch)
    bad = {b.name: b.error for b in trace_run(str(tmp_path)).bad_files}
    assert "a.safetensors with its sidecar a.json" in bad["a.safetensors"]
    assert "losses: Input should be a valid list" in bad["a.safetensors"]  # not 'p', 'p', 'o'
    assert "loss: Input should be" in bad["b.safetensors"]


def test_a_trace_plot_makes_its_missing_folders(run_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    target = tmp_path / "new" / "dir" / "t.svg"
    result = runner.invoke(app, ["trace", str(run_dir), "--plot", str(target)])
    assert result.exit_code == 0, result.output
    assert target.read_text().startswith("<?xml")


def test_a_metrics_file_of_any_name_may_start_with_a_blank_line(tmp_path: Path) -> None:
    lines = [json.dumps({"step": s, "grad_norm": 1.0}) for s in (1, 2, 3)]
    (tmp_path / "train_log.jsonl").write_text("\n" + "\n".join(lines) + "\n")
    trace = trace_run(str(tmp_path))
    assert [s.step for s in trace.steps] == [1, 2, 3] and not trace.bad_files


@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".jsonl"])
def test_a_spike_file_of_another_tokenizer_keeps_its_tokens_as_ids(
    tmp_path: Path, suffix: str
) -> None:
    # --tokenizer builtin decodes the contributors' tokens; a batch file whose tokenizer_sha256
    # names another vocabulary keeps them as ids (another tokenizer's text would be made up),
    # and the spike's note says why
    builtin = vocabulary_sha256(load_tokenizer("builtin"))
    assert builtin is not None
    other = builtin.clone()
    other[0] ^= 1
    texts = {}
    for name, digest in (("same", builtin), ("other", other)):
        out = tmp_path / name
        out.mkdir()
        (out / "metrics.jsonl").write_text(
            "".join(
                json.dumps({"step": s, "grad_norm": g}) + "\n" for s, g in enumerate(GRAD_NORMS, 1)
            )
        )
        tensors = {**dump_tensors(dumpable_batch(2)), "tokenizer_sha256": digest}
        write_batch(out / f"step_000006{suffix}", tensors)
        (spike,) = trace_run(str(out), TraceSettings(top_k=3, tokenizer="builtin")).spikes
        texts[name] = [t.text for t in spike.tokens]
        if name == "same":
            assert spike.note is None
        else:
            assert spike.note is not None and "tokens shown as ids" in spike.note
            assert f"step_000006{suffix}'s tokenizer_sha256" in spike.note
    assert all(isinstance(t, str) for t in texts["same"]) and texts["other"] == [None] * 3
