"""The ``--check`` gate never passes a batch that cannot support a diagnosis, and says why.

A batch with no token in the loss, or one that makes a loss's gradient identically zero (every
advantage zero under a loss whose c_t scales with A, every token masked by the corrections,
hidden states that are all zero, a π_θ one-hot at every sampled token), fails the gate:
``passed`` is false and ``--check`` exits 1. A gradient the loss's own rules switch off
everywhere (a clip on every token) is a finding, not a failure; the entropy bonus on its own
(A = 0) is a gradient like any other. No check's detail prints Python's None.
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


def test_zero_hidden_states_fail_every_loss_though_c_is_not_zero(tmp_path):
    # c_t ≠ 0 at some token, but ∂L/∂W = Σ_t G_t h_tᵀ = 0: before, `--check` passed (exit 0)
    # with every lm_head number of the report 0
    path = batch_file(tmp_path, hidden_states=torch.zeros(2, 3, 4))
    report = compare("--set", f"source.path={path}", code=1)
    bad = failed(report)
    for loss in report["losses"]:
        assert loss["coefficient_abs_max"] > 0 and loss["rows"]["total_norm"] == 0.0
        detail = bad[("diagnosable", loss["name"])]  # ppo_clip: at its unclipped tokens
        assert "every hidden state h_t at the" in detail and "is zero, so ∂L/∂W" in detail
    # one token's hidden state is enough for a gradient to diagnose
    hidden = torch.zeros(2, 3, 4)
    hidden[0, 0, 0] = 1.0  # A = 1 and r < 1 + ε there: no loss clips it
    report = compare("--set", f"source.path={batch_file(tmp_path, hidden_states=hidden)}", code=0)
    assert not any(c["name"] == "diagnosable" and not c["passed"] for c in report["checks"])


def test_a_kept_set_of_the_sampled_token_alone_fails_every_loss(tmp_path):
    # π̃_θ restricted to K_t = {y_t} is 1 at y_t: e_y − π̃_t = 0 at every token
    tokens = torch.tensor([[0, 1, 2], [3, 4, 0]])
    alone = batch_file(tmp_path, kept_ids=tokens[..., None].clone())
    report = compare("--set", f"source.path={alone}", "--set", "loss.sampling_support=kept", code=1)
    bad = failed(report)
    for name in ("reinforce", "ppo", "ppo_clip", "sft"):
        assert "π_θ(y_t) = 1 at every one of the" in bad[("diagnosable", name)]
    pairs = torch.stack([tokens, (tokens + 1) % 5], dim=-1)  # a second token in every set
    report = compare(
        "--set", f"source.path={batch_file(tmp_path, kept_ids=pairs)}",
        "--set", "loss.sampling_support=kept", code=0,
    )  # fmt: skip
    assert not any(c["name"] == "diagnosable" and not c["passed"] for c in report["checks"])


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


@pytest.mark.parametrize("engine", ["materialized", "streamed"])
def test_a_gradient_that_cancels_passes_the_agreement_check(tmp_path, engine):
    # Two sequences with the same tokens and hidden states and A = +1, −1: every loss's ∂L/∂W
    # is a sum of equal and opposite terms, near zero; the closed form and autograd differ by
    # the terms' rounding, which is no disagreement. Judged against the result itself, that
    # difference was 100% of it, and --check failed a correct loss.
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, 3, 4, generator=gen).expand(2, 3, 4).clone()
    path = batch_file(
        tmp_path,
        responses=torch.tensor([[0, 1, 2], [0, 1, 2]]),
        old_log_probs=(-torch.rand(1, 3, generator=gen) - 0.1).expand(2, 3).clone(),
        hidden_states=hidden,
    )
    report = compare(
        "--set", f"source.path={path}", "--set", f"diagnostics.engine={engine}",
        "-l", "reinforce,ppo_clip,sft", code=0,
    )  # fmt: skip
    for loss in report["losses"]:
        assert loss["agreement"]["ran"] and loss["agreement"]["passed"], loss["agreement"]


def test_a_replayed_kept_set_where_pi_y_is_near_one_passes_the_agreement_check(tmp_path):
    # kept sets of y and two tokens the model gives almost nothing: π̃(y) ≈ 1 − 1e-7, so every
    # ∂L/∂z is at float32's rounding of its terms; a correct loss must still pass
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(5, 4, generator=gen)
    weight[3:] = -40.0 * weight[0]  # rows 3 and 4: logits far below every other row's
    hidden = weight[0].abs().mul(3).expand(2, 3, 4).clone()
    ids = torch.tensor([[[0, 3, 4], [1, 3, 4], [2, 3, 4]], [[0, 3, 4], [1, 3, 4], [2, 3, 4]]])
    path = batch_file(
        tmp_path,
        responses=torch.tensor([[0, 1, 2], [0, 1, 2]]),
        lm_head_weight=weight,
        hidden_states=hidden,
        kept_ids=ids,
    )
    report = compare(
        "--set", f"source.path={path}", "--set", "loss.sampling_support=kept", code=0
    )  # fmt: skip
    for loss in report["losses"]:
        assert loss["agreement"]["ran"] and loss["agreement"]["passed"], loss["agreement"]


@pytest.mark.parametrize("engine", ["materialized", "streamed"])
def test_subnormal_products_are_named_as_the_cause_alike_on_both_engines(tmp_path, engine):
    # h_t = 1e-42: every product c_t·(e_y − π)·h_t is subnormal, so ∂L/∂W keeps a few bits
    # (autograd's G_t h_tᵀ) or none (the streamed engine forms c_t·h_t first): the gate fails
    # the batch for that cause on both engines, the zero-sum check allows the absolute
    # rounding of subnormal products rather than calling a pure softmax loss impure, and the
    # agreement check does not judge ∂L/∂W, so no second failure names a wrong cause
    argv = ("-l", "reinforce,sft", "--set", f"diagnostics.engine={engine}")
    for size, cause in [
        # the products are rounding (materialized) or exactly zero (streamed): either says so
        (1e-42, "at the 6 token(s) in the loss is below torch.float32's smallest normal number"),
        (1e-45, "every hidden state h_t at the 6 token(s) in the loss is below torch.float32's "
         "smallest normal number"),
    ]:  # fmt: skip
        path = batch_file(tmp_path, hidden_states=torch.full((2, 3, 4), size))
        report = compare("--set", f"source.path={path}", *argv, code=1)
        assert set(failed(report)) == {("diagnosable", "reinforce"), ("diagnosable", "sft")}
        for loss in report["losses"]:
            assert cause in failed(report)[("diagnosable", loss["name"])]
            assert loss["zero_sum"]["passed"], loss["zero_sum"]
            assert loss["agreement"]["weight_judged"] is False
    # products of 1e-21 and 1e-31, small but normal: the batch supports the diagnosis and ∂L/∂W
    # is judged; the squares of its entries lie below float32's range, where a plain norm
    # reads 0 (then "identically zero") or keeps a few bits (then an agreement failure)
    for size in (1e-20, 1e-30):
        path = batch_file(tmp_path, hidden_states=torch.full((2, 3, 4), size))
        report = compare("--set", f"source.path={path}", *argv, code=0)
        assert all(loss["agreement"]["weight_judged"] for loss in report["losses"])


def test_an_unjudged_weight_gradient_leaves_c_and_the_logit_gradient_judged():
    from gradlens.diagnostics.agreement import judged, weight_unjudged

    tol = judged((0.0, 0.0, 0.0), torch.float32).tolerance
    assert weight_unjudged(judged((0.0, 0.0, 1.0), torch.float32)).passed
    assert not weight_unjudged(judged((0.0, 10 * tol, 1.0), torch.float32)).passed
    assert not weight_unjudged(judged((10 * tol, 0.0, 0.0), torch.float32)).passed
    assert not weight_unjudged(judged((None, 0.0, 0.0), torch.float32)).passed


def test_a_gradient_that_is_only_rounding_fails_the_gate_and_float64_passes():
    # entropy 1e-10: π_θ(y) rounds to 1 in float32 at every token, so ∂L/∂z_y = 0 and the
    # rest of ∂L/∂W is the rounding of π's other entries; float64 resolves the real gradient
    argv = ["--set", "source.num_sequences=4", "--set", "source.entropy=1e-10", "-l", "sft"]
    report = compare(*argv, code=1)
    detail = failed(report)[("diagnosable", "sft")]
    assert "rounding noise: π_θ(y_t) rounds to 1 in float32" in detail and "float64" in detail
    assert compare(*argv, "--set", "dtype=float64", code=0)["passed"]
