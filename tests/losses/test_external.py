"""The user's own loss (``module:function``) and verl-shaped functions (``verl:module:function``).

gradlens takes c_t = ∂L/∂ℓ_t of a user function by autograd on the [N, T] log-probs; the
closed form then follows from the master identity, and the autograd twin differentiates the same
function through log_softmax(W h). Both are exact, so a correct user function must agree with
the built-in loss it implements to rounding.
"""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import random_batch, rel_err
from typer.testing import CliRunner

from gradlens.cli import app
from gradlens.compare import run_compare
from gradlens.config import validate
from gradlens.errors import GradlensError
from gradlens.grads import autograd_reference, closed_form, softmax_view
from gradlens.losses import AGGREGATIONS, Aggregation, LossParams, get_loss, loss_names
from gradlens.losses.external import LossSettings
from gradlens.losses.frameworks.verl import VERL_AGGREGATION, VerlConfig, config_values

runner = CliRunner()

# Written to a file per test: a plain PPO-clip (token mean), a function that records the
# optional arguments it was given, and a verl-shaped vanilla PPO in verl's own style.
USER_MODULE = textwrap.dedent(
    """
    import torch

    SEEN = {}

    def ppo_clip_mean(logp, old_logp, advantages, mask):
        r = torch.exp(logp - old_logp)
        surrogate = torch.maximum(-advantages * r, -advantages * torch.clamp(r, 0.8, 1.28))
        return (surrogate * mask).sum() / mask.sum()

    def with_options(logp, old_logp, advantages, mask, *, rollout_logp=None, ref_logp=None,
                     aggregation=None):
        SEEN.update(rollout=rollout_logp is not None, ref=ref_logp is not None,
                    aggregation=aggregation)
        return (-advantages * logp * mask).sum() / mask.sum()

    def per_token(logp, old_logp, advantages, mask):
        return -advantages * logp * mask

    def a_number(logp, old_logp, advantages, mask):
        return 1.0

    def detached(logp, old_logp, advantages, mask):
        return (-advantages * logp.detach() * mask).sum()

    def broken(logp, old_logp, advantages, mask):
        raise ValueError("this loss is broken")

    def asserting(logp, old_logp, advantages, mask):
        assert mask.sum() > 1e9
        return (logp * mask).sum()

    def clipped_by_settings(logp, old_logp, advantages, mask, *, settings):
        # PPO-clip written against the run's own loss section
        SEEN["settings"] = settings.as_dict()
        r = torch.exp(logp - old_logp)
        low, high = 1 - settings.eps_low, 1 + settings.eps_high
        surrogate = torch.maximum(-advantages * r, -advantages * torch.clamp(r, low, high))
        return (surrogate * mask).sum() / mask.sum()

    def with_metrics(logp, old_logp, advantages, mask):
        loss = (-advantages * logp * mask).sum() / mask.sum()
        return loss, {"my_share": torch.tensor(0.25), "a_count": 3, "a_label": "not a number"}

    def three_things(logp, old_logp, advantages, mask):
        return (logp * mask).sum(), {}, {}

    NOT_A_FUNCTION = 3

    def agg(values, mask, mode):
        # verl 0.9's agg_loss without batch info, written out
        present = (mask.sum(-1) > 0).sum()
        if mode == "token-mean":
            return (values * mask).sum() / mask.sum()
        if mode == "token-sum":
            return (values * mask).sum()
        if mode == "seq-mean-token-mean":
            per_seq = (values * mask).sum(-1) / mask.sum(-1).clamp(min=1)
            return per_seq[mask.sum(-1) > 0].mean()
        if mode == "seq-mean-token-sum":
            return ((values * mask).sum(-1))[mask.sum(-1) > 0].mean()
        if mode == "seq-mean-token-sum-norm":
            return (values * mask).sum() / (present * mask.shape[-1])
        raise ValueError(mode)

    def compute_policy_loss_vanilla(old_log_prob, log_prob, advantages, response_mask,
                                    loss_agg_mode="token-mean", config=None,
                                    rollout_is_weights=None):
        clip_low, clip_high = config.clip_ratio_low, config.clip_ratio_high
        clip_low = clip_low if clip_low is not None else config.clip_ratio
        clip_high = clip_high if clip_high is not None else config.clip_ratio
        clip_c = config.get("clip_ratio_c", 3.0)
        assert clip_c > 1.0
        ratio = torch.exp(log_prob - old_log_prob)
        pg1 = -advantages * ratio
        pg2 = -advantages * torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
        clip1 = torch.maximum(pg1, pg2)
        pg3 = -advantages * clip_c
        clip2 = torch.min(pg3, clip1)
        pg_losses = torch.where(advantages < 0, clip2, clip1)
        frac = ((pg2 > pg1).float() * response_mask).sum() / response_mask.sum()
        lower = ((clip1 > pg3).float() * (advantages < 0).float() * response_mask).sum()
        lower = lower / response_mask.sum()
        loss = agg(pg_losses, response_mask, loss_agg_mode)
        return loss, {"actor/pg_clipfrac": frac.item(), "actor/pg_clipfrac_lower": lower.item()}

    def old_style(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean",
                  config=None):
        loss = agg(-advantages * log_prob, response_mask, loss_agg_mode)
        return loss, torch.tensor(0.25), torch.tensor(0.0), torch.tensor(0.0)

    def forced_seq_mean(old_log_prob, log_prob, advantages, response_mask,
                        loss_agg_mode="token-mean", config=None):
        # verl's GSPO and SAPO ignore loss_agg_mode (trap A7)
        return agg(-advantages * log_prob, response_mask, "seq-mean-token-mean"), {}
    """
)


@pytest.fixture
def module(tmp_path: Path) -> str:
    path = tmp_path / "my_losses.py"
    path.write_text(USER_MODULE)
    return str(path)


SHORT = {"min_length": 4, "max_length": 12}


def batch():
    return random_batch(2, n=6, t=5, v=11, h=7, drift=0.6)


def config(*losses: str, **loss: object):
    return validate(
        {
            "losses": list(losses),
            "loss": loss,
            "source": {"vocab_size": 64, "hidden_size": 8, "num_sequences": 8, **SHORT},
        }
    )


# ----------------------------------------------------------------------------- user losses


def test_a_user_ppo_clip_matches_the_built_in_exactly(module: str) -> None:
    b = batch()
    view = softmax_view(b)
    user = get_loss(f"{module}:ppo_clip_mean")
    built_in = get_loss("ppo_clip")
    params, agg = LossParams(), Aggregation("token_mean")
    mine = closed_form(b, view, user, params, agg)
    theirs = closed_form(b, view, built_in, params, agg)
    # float64: autograd on ℓ vs the closed form of the same formula, ~1e-16
    assert rel_err(mine.coefficient, theirs.coefficient) <= 1e-12
    assert rel_err(mine.grad_weight, theirs.grad_weight) <= 1e-12
    assert mine.loss == pytest.approx(theirs.loss, abs=1e-14)
    assert torch.all(mine.weights[b.mask] == 1.0)  # the function aggregates itself
    assert bool(theirs.terms.regions["clip_upper"].any())  # the clip is exercised


@pytest.mark.parametrize("mode", list(AGGREGATIONS))
def test_a_user_loss_agrees_with_autograd_through_the_logits(module: str, mode: str) -> None:
    b = batch()
    spec = get_loss(f"{module}:ppo_clip_mean")
    closed = closed_form(b, softmax_view(b), spec, LossParams(), Aggregation(mode, 5.0))
    ref = autograd_reference(b, spec, LossParams(), Aggregation(mode, 5.0))
    assert rel_err(closed.coefficient[b.mask], ref.coefficient[b.mask]) <= 1e-12
    assert rel_err(closed.grad_logits, ref.grad_logits) <= 1e-12
    assert rel_err(closed.grad_weight, ref.grad_weight) <= 1e-12
    assert closed.loss == pytest.approx(ref.loss, abs=1e-14)


def test_a_user_loss_runs_through_compare(module: str) -> None:
    name = f"{module}:ppo_clip_mean"
    report = run_compare(config("ppo_clip", name))
    assert report.passed, [c for c in report.checks if not c.passed]
    assert [r.name for r in report.losses] == ["ppo_clip", name]
    user = report.losses[1]
    assert user.formula.startswith("user function")
    assert user.agreement.passed and user.zero_sum.passed
    assert user.rows.total_norm == pytest.approx(report.losses[0].rows.total_norm, rel=1e-5)
    assert name not in loss_names()  # resolved for the run, not added to the registry


def test_an_importable_module_is_found(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    package = tmp_path / "mypkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "losses.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("mypkg", "mypkg.losses"):  # another test's mypkg may be imported already
        monkeypatch.delitem(sys.modules, name, raising=False)
    report = run_compare(config("mypkg.losses:ppo_clip_mean"))
    assert report.passed


def test_optional_arguments_are_passed_when_declared(module: str) -> None:
    name = f"{module}:with_options"
    cfg = validate(
        {
            "losses": [name],
            "loss": {"aggregation": "seq_mean_token_mean"},
            "source": {"vocab_size": 64, "num_sequences": 4, "rollout_drift": 0.1},
        }
    )
    run_compare(cfg)
    loaded = [m for m in list(sys.modules.values()) if getattr(m, "__file__", None) == module]
    seen = loaded[-1].SEEN
    assert seen == {"rollout": True, "ref": False, "aggregation": "seq_mean_token_mean"}


@pytest.mark.parametrize(
    "function, message",
    [
        (
            "per_token",
            "returned a tensor of shape [6, 5]; expected a scalar (0-d) tensor: these "
            "look like per-token losses",
        ),
        ("a_number", "returned float; expected a scalar (0-d) torch.Tensor"),
        ("detached", "does not depend on logp"),
        ("broken", "raised ValueError: this loss is broken"),
        # a bare assert names its file, line and source
        ("asserting", "raised AssertionError (at {module}:"),
        ("asserting", ": assert mask.sum() > 1e9)"),
        ("three_things", "returned a tuple of 3 items; expected the loss, or (loss, metrics)"),
    ],
)
def test_bad_user_functions_give_clear_errors(module: str, function: str, message: str) -> None:
    b = batch()
    spec = get_loss(f"{module}:{function}")
    with pytest.raises(GradlensError) as info:
        closed_form(b, softmax_view(b), spec, LossParams(), Aggregation())
    assert message.format(module=module) in str(info.value)


def test_a_user_loss_reads_the_resolved_loss_section(module: str) -> None:
    name = f"{module}:clipped_by_settings"
    cfg = config(
        "ppo_clip",
        name,
        eps_low=0.1,
        eps_high=0.15,
        aggregation="seq_mean_token_mean",
        corrections=[{"kind": "geo_mask", "renormalize": True}],
    )
    source = {"vocab_size": 64, "num_sequences": 8, **SHORT, "rollout_drift": 0.1}
    cfg = validate({**cfg.model_dump(mode="json"), "source": source})
    report = run_compare(cfg)
    loaded = [m for m in list(sys.modules.values()) if getattr(m, "__file__", None) == module]
    seen = loaded[-1].SEEN["settings"]
    assert (seen["eps_low"], seen["eps_high"]) == (0.1, 0.15)
    assert seen["aggregation"] == "seq_mean_token_mean" and seen["kl_coef"] == 0.04
    (correction,) = seen["corrections"]
    assert (correction.kind, correction.renormalize) == ("geo_mask", True)
    assert report.losses[1].agreement.passed


def test_settings_name_what_a_loss_section_lacks() -> None:
    settings = LossSettings(LossParams(), Aggregation())
    assert settings.tau_neg == 1.05 and settings.count_empty_sequences is False
    with pytest.raises(AttributeError, match="no setting 'eps'; it has"):
        _ = settings.eps


def test_the_metrics_a_user_loss_returns_are_reported(module: str) -> None:
    name = f"{module}:with_metrics"
    report = run_compare(config("reinforce", name))
    assert report.passed
    # numbers only, under reported:; the label is left out
    assert report.losses[1].metrics == {"reported:my_share": 0.25, "reported:a_count": 3.0}
    assert report.losses[1].rows.total_norm == pytest.approx(report.losses[0].rows.total_norm)
    table = runner.invoke(app, ["compare", "--losses", name, "--set", "source.vocab_size=64"])
    assert table.exit_code == 0 and "reported:my_share" in table.stdout


@pytest.mark.parametrize(
    "name, message",
    [
        ("no_such_module_xyz:fn", "module 'no_such_module_xyz' not found"),
        ("{module}:missing", "has no attribute 'missing'"),
        ("{module}:NOT_A_FUNCTION", "'NOT_A_FUNCTION' is a int, not a function"),
        ("/no/such/file.py:fn", "no such file"),
        ("{module}:", "expected module:function"),
    ],
)
def test_unresolvable_names_are_config_errors(module: str, name: str, message: str) -> None:
    with pytest.raises(GradlensError) as info:
        validate({"losses": [name.format(module=module)]})
    assert "losses:" in str(info.value) and message in str(info.value)


def test_the_cli_reports_a_missing_user_loss_as_bad_input() -> None:
    result = runner.invoke(app, ["compare", "--losses", "no_such_module_xyz:fn"])
    assert result.exit_code == 2
    assert "not found" in result.output


def test_a_user_loss_under_no_grad_still_gets_its_coefficient(module: str) -> None:
    # sweeps call loss functions under torch.no_grad()
    b = batch()
    spec = get_loss(f"{module}:ppo_clip_mean")
    with torch.no_grad():
        closed = closed_form(b, softmax_view(b), spec, LossParams(), Aggregation())
    assert float(closed.coefficient.abs().max()) > 0


# ----------------------------------------------------------------------------- verl-shaped


def stand_in(params: LossParams, agg: Aggregation) -> VerlConfig:
    mask = torch.ones(2, 3, dtype=torch.bool)
    return VerlConfig(config_values("vanilla", params, agg, mask, None, "verl:test"))


def test_the_verl_config_speaks_verls_names() -> None:
    cfg = stand_in(LossParams(eps_low=0.1, eps_high=0.3, dual_clip=3.0), Aggregation())
    assert (cfg.clip_ratio_low, cfg.clip_ratio_high, cfg.clip_ratio_c) == (0.1, 0.3, 3.0)
    assert cfg["clip_ratio_low"] == 0.1 and cfg.get("clip_ratio_c", 9) == 3.0
    assert cfg.loss_agg_mode == "token-mean"
    assert cfg.something_else is None and cfg.get("something_else", 7) == 7
    # verl's agg_loss reads **config.global_batch_info: a dict, the loss scale inside it
    assert cfg.global_batch_info == {"dp_size": 1, "loss_scale_factor": None}
    no_dual_clip = stand_in(LossParams(), Aggregation())  # gradlens: no dual clip
    assert no_dual_clip.clip_ratio_c == float("inf")
    with pytest.raises(AttributeError):
        cfg.clip_ratio = 0.5  # type: ignore[misc]
    # the trainer's global_batch_size counts every row: B = 2 here
    all_rows = stand_in(LossParams(), Aggregation("token_mean", 8.0, count_empty_sequences=True))
    assert all_rows.global_batch_info == {
        "dp_size": 1,
        "loss_scale_factor": 8.0,
        "global_batch_size": 2.0,
    }


def test_an_aggregation_verl_does_not_have_is_a_clear_error(module: str) -> None:
    b = batch()
    spec = get_loss(f"verl:{module}:compute_policy_loss_vanilla")
    with pytest.raises(GradlensError, match=r"token_sum_norm .* has no verl twin"):
        closed_form(b, softmax_view(b), spec, LossParams(), Aggregation("token_sum_norm"))


@pytest.mark.parametrize("dual_clip", [None, 3.0])
@pytest.mark.parametrize("mode", list(VERL_AGGREGATION))
def test_a_verl_shaped_vanilla_loss_matches_ppo_clip(
    module: str, mode: str, dual_clip: float | None
) -> None:
    b = batch()
    view = softmax_view(b)
    params = LossParams(eps_low=0.2, eps_high=0.2, dual_clip=dual_clip)
    agg = Aggregation(mode)
    verl = closed_form(b, view, get_loss(f"verl:{module}:compute_policy_loss_vanilla"), params, agg)
    ours = closed_form(b, view, get_loss("ppo_clip"), params, agg)
    assert rel_err(verl.coefficient, ours.coefficient) <= 1e-12
    assert verl.loss == pytest.approx(ours.loss, abs=1e-14)
    reported = verl.terms.reported
    assert set(reported) == {"reported:actor/pg_clipfrac", "reported:actor/pg_clipfrac_lower"}
    upper, lower = ours.terms.regions["clip_upper"], ours.terms.regions["clip_lower"]
    region = float(((upper | lower) & b.mask).sum()) / b.num_tokens
    assert reported["reported:actor/pg_clipfrac"] == pytest.approx(region)
    if dual_clip is not None:
        dual = float((ours.terms.regions["clip_dual"] & b.mask).sum()) / b.num_tokens
        assert dual > 0
        assert reported["reported:actor/pg_clipfrac_lower"] == pytest.approx(dual)


def test_verl_shaped_functions_run_through_compare_and_report_their_metrics(module: str) -> None:
    vanilla, old = f"verl:{module}:compute_policy_loss_vanilla", f"verl:{module}:old_style"
    report = run_compare(config("ppo_clip", vanilla, old, eps_high=0.2))
    assert report.passed, [c for c in report.checks if not c.passed]
    metrics = report.losses[1].metrics
    assert metrics["reported:actor/pg_clipfrac"] == pytest.approx(report.losses[0].clipping.region)
    # older verl returns (loss, pg_clipfrac, ppo_kl, pg_clipfrac_lower): named by position
    assert report.losses[2].metrics == {
        "reported:actor/pg_clipfrac": 0.25,
        "reported:actor/ppo_kl": 0.0,
        "reported:actor/pg_clipfrac_lower": 0.0,
    }


def test_a_verl_function_that_forces_its_aggregation_is_caught_by_parity(module: str) -> None:
    # loss.aggregation = token_mean, but the function always uses seq-mean-token-mean (A7)
    name = f"verl:{module}:forced_seq_mean"
    cfg = validate(
        {
            "losses": ["reinforce", name],
            "parity": {"pairs": [["reinforce", name]]},
            "source": {"vocab_size": 64, "num_sequences": 8, **SHORT},
        }
    )
    report = run_compare(cfg)
    assert len(report.parity) == 1 and not report.parity[0].passed
    assert not report.passed
    same = validate({**cfg.model_dump(mode="json"), "loss": {"aggregation": "seq_mean_token_mean"}})
    report = run_compare(same)
    assert report.parity[0].passed


def test_verl_and_user_losses_through_the_cli_with_parity(module: str) -> None:
    result = runner.invoke(
        app,
        [
            "compare",
            "--parity",
            f"ppo_clip,verl:{module}:compute_policy_loss_vanilla",
            "--set",
            "source.vocab_size=64",
            "--set",
            "loss.eps_high=0.2",
            "--check",
            "-f",
            "json",
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert [r["name"] for r in report["losses"]] == [
        "ppo_clip",
        f"verl:{module}:compute_policy_loss_vanilla",
    ]
    assert report["parity"][0]["passed"] is True
    assert report["parity"][0]["grad_norm_ratio"] == pytest.approx(1.0, abs=1e-5)
    assert any(c["name"] == "parity" and c["passed"] for c in report["checks"])
