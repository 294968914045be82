"""The `gradlens` command line: output formats, --check, and the built-in default."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from gradlens.cli import app
from gradlens.config import Config, validate
from gradlens.losses import loss_names
from gradlens.results import CompareReport

REPO = Path(__file__).resolve().parents[2]
runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, list(args))


@pytest.fixture(scope="module")
def default_json() -> dict:
    result = invoke("compare", "--format", "json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.mark.slow
def test_default_table_shows_every_section():
    result = invoke("compare")
    assert result.exit_code == 0, result.output
    out = result.stdout
    for text in (
        "losses side by side",
        "ratio r = π_θ(y)/π_old(y)",
        "zero-sum",
        "agreement",
        "largest lm_head gradient rows",
        "attribution: shares ⟨part, G⟩/‖G‖²",
        "largest token shares",
        "largest sequence shares",
        "checks: 18/18 passed",
    ):
        assert text in out
    for name in ("reinforce", "ppo", "ppo_clip", "sft"):
        assert name in out


@pytest.mark.slow
def test_table_is_not_truncated_when_stdout_is_not_a_terminal():
    # CliRunner's stdout is not a TTY: the longest formula must appear whole, on one line.
    result = invoke("compare", "--losses", "ppo_clip")
    formula = "max(−A·r, −A·clip(r, 1−eps_low, 1+eps_high)) [dual clip: min(·, −c·A) for A<0]"
    assert any(formula in line for line in result.stdout.splitlines())
    assert "…" not in result.stdout


def test_json_report_is_versioned_and_self_describing(default_json):
    report = CompareReport.model_validate(default_json)  # the output obeys its own schema
    assert report.schema_version == "gradlens.compare/3"
    env = default_json["environment"]
    assert {"gradlens", "python", "torch", "platform", "device", "dtype", "seed"} <= env.keys()
    assert env["device"] == "cpu" and env["dtype"] == "float32" and env["seed"] == 0
    # the resolved config is echoed and re-validates to the built-in default
    assert validate(default_json["config"]) == Config()
    assert [r["name"] for r in default_json["losses"]] == ["reinforce", "ppo", "ppo_clip", "sft"]
    assert default_json["passed"] is True
    assert all(c["passed"] for c in default_json["checks"])


def test_default_batch_shows_the_clip_and_the_other_rows(default_json):
    by_name = {r["name"]: r for r in default_json["losses"]}
    assert by_name["ppo_clip"]["clipping"]["region"] > 0
    assert by_name["reinforce"]["clipping"]["region"] is None  # no clip rule: undefined, not 0
    for r in default_json["losses"]:
        row = r["sampled_row"]
        # zero-sum per token: the other rows carry exactly the sampled row's mass
        assert row["other_mass_mean"] == pytest.approx(row["sampled_abs_mean"], rel=1e-5)
        assert r["rows"]["sampled_rows"]["count"] + r["rows"]["other_rows"]["count"] == 2048


def test_default_report_attributes_each_loss(default_json):
    # auto attribution with the materialized engine: every loss has the section, its token
    # shares sum to 1 (float32 operands over 643 tokens: rounding far below 1e-4), and so does
    # every group of shares
    for r in default_json["losses"]:
        a = r["attribution"]
        assert a["share_sum"] == pytest.approx(1.0, abs=1e-4)
        for group in a["groups"].values():
            assert sum(group["shares"].values()) == pytest.approx(1.0, abs=1e-4)


PNG = b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_plot_draws_the_attribution(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "attribution.png"
    result = invoke("compare", "--losses", "grpo,ppo_clip", "--plot", str(path))
    assert result.exit_code == 0, result.output
    assert path.read_bytes()[:8] == PNG
    assert f"wrote the plot to {path}" in result.stderr
    assert "attribution: shares" in result.stdout  # the report is printed as well


@pytest.mark.slow
def test_plot_turns_the_attribution_on_with_the_streamed_engine(tmp_path):
    # attribution auto runs with the materialized engine only; --plot asks for it, so the
    # streamed engine (which auto picks for a real vocabulary) computes it too
    pytest.importorskip("matplotlib")
    path = tmp_path / "attribution.png"
    result = invoke(
        "compare", "-l", "ppo_clip", "--engine", "streamed", "--plot", str(path), "-f", "json"
    )
    assert result.exit_code == 0, result.output
    assert path.read_bytes()[:8] == PNG
    report = json.loads(result.stdout)
    assert report["engine"]["path"] == "streamed"
    assert report["config"]["diagnostics"]["attribution"] == "on"
    assert report["losses"][0]["attribution"] is not None
    # without --plot, auto leaves it off on the streamed engine (one GEMM-equivalent saved)
    plain = json.loads(
        invoke("compare", "-l", "ppo_clip", "--engine", "streamed", "-f", "json").stdout
    )
    assert plain["losses"][0]["attribution"] is None


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--plot", "a.gif"], "the file name must end in .png, .svg, .pdf"),
        (
            ["--plot", "a.png", "--set", "diagnostics.attribution=off"],
            "diagnostics.attribution is 'off'",
        ),
    ],
)
def test_plot_without_an_attribution_is_a_clear_error(tmp_path, monkeypatch, args, expected):
    pytest.importorskip("matplotlib")
    monkeypatch.chdir(tmp_path)
    result = invoke("compare", "--losses", "ppo_clip", *args)
    assert result.exit_code == 2, result.output
    assert expected in result.stderr
    assert result.stdout == ""  # nothing half-written
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_losses_flag_selects_and_orders():
    result = invoke("compare", "--losses", "sft,reinforce", "--format", "json")
    assert result.exit_code == 0, result.output
    assert [r["name"] for r in json.loads(result.stdout)["losses"]] == ["sft", "reinforce"]


def test_set_overrides_beat_the_file(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("loss: {eps_high: 0.5}\nsource: {vocab_size: 64, hidden_size: 8}\n")
    result = invoke("compare", "-c", str(cfg), "--set", "loss.eps_high=0.3", "-f", "json")
    assert result.exit_code == 0, result.output
    config = json.loads(result.stdout)["config"]
    assert config["loss"]["eps_high"] == 0.3  # --set > file
    assert config["source"]["vocab_size"] == 64  # file > defaults
    assert config["loss"]["eps_low"] == 0.2  # defaults fill the rest


@pytest.mark.slow
def test_check_passes_on_the_default():
    assert invoke("compare", "--check").exit_code == 0


def test_check_fails_on_an_overflowing_ratio_and_reports_it_as_a_finding(tmp_path):
    # π_old(y) = e^−200 in float32: r = π_θ/π_old = e^199 overflows, so ppo's gradient is inf/NaN.
    cfg = tmp_path / "explode.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "dtype": "float32",
                "losses": ["reinforce", "ppo"],
                "source": {
                    "kind": "literal",
                    "sequences": [
                        {
                            "positions": [
                                {
                                    "probs": [0.5, 0.3, 0.2],
                                    "token": 1,
                                    "old_logp": -200.0,
                                    "advantage": 1.0,
                                }
                            ]
                        }
                    ],
                },
            }
        )
    )
    result = invoke("compare", "-c", str(cfg), "--check", "-f", "json")
    assert result.exit_code == 1  # a failed invariant, not a crash
    report = json.loads(result.stdout)
    ppo = report["losses"][1]
    assert ppo["non_finite"] > 0
    assert any("NaN or inf" in f for f in ppo["findings"])
    failed = {(c["name"], c["loss"]) for c in report["checks"] if not c["passed"]}
    assert ("finite", "ppo") in failed
    assert ("finite", "reinforce") not in failed
    # without --check the same run is a report, exit 0
    assert invoke("compare", "-c", str(cfg)).exit_code == 0


def test_losses_command_lists_every_registered_loss():
    result = invoke("losses")
    assert result.exit_code == 0
    for name in loss_names():
        assert name in result.stdout
    data = json.loads(invoke("losses", "--format", "json").stdout)
    assert [row["name"] for row in data["losses"]] == loss_names()
    assert all(row["formula"] and row["per_token_grad"] and row["paper"] for row in data["losses"])
    rows = {row["name"]: row for row in data["losses"]}
    assert rows["real"]["coupling"] == "group" and rows["real"]["needs"] == ["groups"]
    assert rows["kl_cov"]["coupling"] == "batch" and rows["reinforce"]["coupling"] == "token"
    assert "top_entropy_quantile" in result.stdout


def test_config_command_round_trips(tmp_path):
    result = invoke("config", "--set", "loss.dual_clip=3")
    assert result.exit_code == 0
    data = yaml.safe_load(result.stdout)
    assert validate(data).loss.dual_clip == 3.0


def test_schema_command_matches_the_report_model():
    schema = json.loads(invoke("schema").stdout)
    assert schema["$id"] == "gradlens.compare/3"
    assert set(schema["required"]) >= {"environment", "config", "batch", "ratio", "losses"}


def test_every_option_is_documented_in_help():
    result = invoke("compare", "--help")
    assert result.exit_code == 0
    for option in ("--losses", "--config", "--set", "--device", "--format", "--check", "--debug"):
        assert option in result.stdout


@pytest.mark.slow
def test_runs_from_any_directory_as_a_module(tmp_path):
    # The built-in default ships inside the package: no file from the repository is needed.
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "gradlens",
            "compare",
            "--losses",
            "reinforce",
            "-f",
            "json",
            "--set",
            "source.vocab_size=128",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["passed"] is True


SHIPPED = sorted(
    p.name for p in (REPO / "configs").glob("*.yaml") if not p.name.startswith("sweep_")
)


# The hand-written literal_* configs run in a fraction of a second; the others build the synthetic
# default batch or a model, seconds each: slow (the default itself runs in `default_json`).
@pytest.mark.parametrize(
    "path",
    [
        pytest.param(p, marks=[] if p.startswith("literal_") else [pytest.mark.slow])
        for p in SHIPPED
    ],
)
def test_every_shipped_config_runs_and_passes_its_checks(path):
    result = invoke("compare", "--config", str(REPO / "configs" / path), "--check", "-f", "json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["passed"] is True


@pytest.mark.slow
def test_on_policy_config_has_unit_ratio_and_no_clipping():
    result = invoke("compare", "-c", str(REPO / "configs" / "on_policy.yaml"), "-f", "json")
    report = json.loads(result.stdout)
    assert report["ratio"]["min"] == 1.0 and report["ratio"]["max"] == 1.0
    clip = {r["name"]: r["clipping"] for r in report["losses"]}["ppo_clip"]
    assert clip["region"] == 0.0
