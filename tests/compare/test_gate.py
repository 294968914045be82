"""The ``--check`` gate never passes a batch that cannot support a diagnosis, and says why.

A batch with no token in the loss, or one that makes a loss's gradient identically zero (every
advantage zero under a loss whose c_t scales with A, every token masked by the corrections),
fails the gate: ``passed`` is false and ``--check`` exits 1. A gradient the loss's own rules
switch off everywhere (a clip on every token) is a finding, not a failure; the entropy bonus on
its own (A = 0) is a gradient like any other. No check's detail prints Python's None.
"""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from typer.testing import CliRunner

from gradlens.cli import app

runner = CliRunner()


def batch_file(tmp_path, **changes) -> str:
    gen = torch.Generator().manual_seed(0)
    data = {
        "responses": torch.tensor([[0, 1, 2], [3, 4, 0]]),
        "response_mask": torch.ones(2, 3, dtype=torch.long),
        "old_log_probs": -torch.rand(2, 3, generator=gen) - 0.1,
        "advantages": torch.tensor([1.0, -1.0]),
        "hidden_states": torch.randn(2, 3, 4, generator=gen),
        "lm_head_weight": torch.randn(5, 4, generator=gen),
        **changes,
    }
    path = tmp_path / "batch.pt"
    torch.save(data, path)
    return str(path)


def compare(*args: str, code: int) -> dict:
    result = runner.invoke(app, ["compare", "--check", "-f", "json", *args])
    assert result.exit_code == code, result.output
    return json.loads(result.stdout)


def failed(report: dict) -> dict[tuple[str, str | None], str]:
    return {(c["name"], c["loss"]): c["detail"] for c in report["checks"] if not c["passed"]}


def test_a_batch_with_no_token_in_the_loss_fails_the_gate(tmp_path):
    path = batch_file(tmp_path, response_mask=torch.zeros(2, 3, dtype=torch.long))
    report = compare("--set", f"source.path={path}", code=1)  # main: exit 0, 13/13 passed
    assert not report["passed"]
    bad = failed(report)
    assert "no valid token" in bad[("tokens", None)]
    assert "'response_mask' is all zero" in bad[("tokens", None)]
    for loss in ("reinforce", "ppo", "ppo_clip", "sft"):
        assert "no token enters the loss" in bad[("diagnosable", loss)]


def test_every_advantage_zero_fails_the_losses_that_scale_with_a(tmp_path):
    path = batch_file(tmp_path, advantages=torch.zeros(2))
    report = compare("--set", f"source.path={path}", code=1)
    bad = failed(report)
    assert set(bad) == {("diagnosable", loss) for loss in ("reinforce", "ppo", "ppo_clip")}
    assert "every advantage is zero at the 6 token(s) in the loss" in bad[("diagnosable", "ppo")]
    signals = {r["name"]: r["signal"] for r in report["losses"]}
    assert signals["sft"] == {"zero": False, "cause": None, "from_inputs": False}  # c_t = −a_t
    assert signals["reinforce"]["zero"] and signals["reinforce"]["from_inputs"]


@pytest.mark.slow
def test_corrections_that_mask_every_token_fail_every_loss():
    # icepop keeps a token only when ρ = π_old/μ_old lies in [100, 200]: with a rollout drift
    # of 0.1 nats ρ stays within a few percent of 1, so every token gets weight 0
    report = compare(
        "--set",
        "source.rollout_drift=0.1",
        "--set",
        "loss.corrections=[{kind: icepop, low: 100, high: 200}]",
        code=1,
    )
    bad = failed(report)
    assert set(bad) == {("diagnosable", r["name"]) for r in report["losses"]}
    assert "loss.corrections (icepop) give weight 0 to every one" in bad[("diagnosable", "sft")]


def test_a_clip_on_every_token_is_a_finding_not_a_failure(tmp_path):
    # losses.md TC6: r = 2 > 1 + eps_high with A > 0, so ppo_clip's gradient is exactly zero
    position = {"probs": [0.5, 0.2, 0.15, 0.1, 0.05], "token": 0, "old_prob": 0.25}
    cfg = tmp_path / "clip.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "losses": ["ppo_clip", "sft"],
                "source": {
                    "kind": "literal",
                    "sequences": [{"positions": [{**position, "advantage": 1.0}]}],
                },
            }
        )
    )
    report = compare("-c", str(cfg), code=0)
    clip = report["losses"][0]
    assert clip["signal"]["zero"] and not clip["signal"]["from_inputs"]
    assert "clip_upper" in clip["signal"]["cause"]
    assert any("identically zero" in f for f in clip["findings"])
    assert report["passed"]


def test_no_check_detail_prints_none_and_unmeasured_values_say_why(tmp_path):
    # π_old(y) = e^−200 in float32: r = e^199 overflows, ppo's gradient is NaN/inf
    position = {"probs": [0.5, 0.3, 0.2], "token": 1, "old_logp": -200.0, "advantage": 1.0}
    cfg = tmp_path / "explode.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "losses": ["reinforce", "ppo"],
                "source": {"kind": "literal", "sequences": [{"positions": [position]}]},
            }
        )
    )
    report = compare("-c", str(cfg), code=1)
    details = [c["detail"] for c in report["checks"]]
    assert not any("None" in d for d in details), details
    bad = failed(report)
    assert "not measured" in bad[("zero_sum", "ppo")]
    assert "not measured" in bad[("agreement", "ppo")]
    table = runner.invoke(app, ["compare", "-c", str(cfg), "--check"])
    assert table.exit_code == 1 and "None" not in table.stdout
