"""How each framework aggregates a loss under micro-batches × data parallel × accumulation: tables.

One `Convention` per framework and version range, each setting a `SplitRule`
(`gradlens.losses.split` has the maths): which aggregation mode one micro-batch computes, where
its normaliser is counted ("micro": the micro-batch alone; "step": the whole optimizer step, over
every rank and accumulation step) and the factor dp^p·ga^q its code multiplies each
micro-batch's loss by. Every framework here averages gradients over the data-parallel ranks and
sums them over the accumulation steps. The modes are those of docs/losses.md §3 (the same
framework settings on one micro-batch); the versions are those the frameworks' adapters
(`gradlens.losses.frameworks.verl`, ``trl``, ``openrlhf``) support.

``--convention verl`` picks the setting that computes ``loss.aggregation``;
``--convention trl:bnpo`` names it (needed where two settings compute the same mode).
"""

from __future__ import annotations

from gradlens.errors import GradlensError, unknown_name_message
from gradlens.losses.split import Convention, SplitRule

_VERL_SOURCE = (
    "verl 0.9.1 trainer/ppo/core_algos.py agg_loss (dp_size, batch_num_tokens, "
    "global_batch_size) and workers/engine/fsdp/transformer_impl.py forward_backward_batch "
    "(batch_num_tokens all-reduced over the dp group; loss.backward() per micro-batch)"
)
_VERL_HOW = (
    "every micro-batch divides by the step's {what} (all-reduced over the dp ranks) and "
    "multiplies by dp_size, which undoes the rank average; the micro-batches' gradients add up"
)


def _verl(name: str, mode: str, what: str) -> SplitRule:
    return SplitRule(name, mode, True, "step", 1, 0, _VERL_HOW.format(what=what), _VERL_SOURCE)


VERL = Convention(
    name="verl",
    framework="verl",
    versions="0.7–0.9 (token-sum: 0.9), the engine workers with global batch info",
    rules=(
        _verl("token-mean", "token_mean", "token count batch_num_tokens"),
        SplitRule(
            "token-sum",
            "token_sum",
            True,
            "step",
            1,
            0,
            "every micro-batch's token sum is multiplied by dp_size, which undoes the rank "
            "average; the micro-batches' gradients add up",
            _VERL_SOURCE,
        ),
        _verl("seq-mean-token-mean", "seq_mean_token_mean", "batch size global_batch_size"),
        _verl("seq-mean-token-sum", "seq_mean_token_sum", "batch size global_batch_size"),
        _verl(
            "seq-mean-token-sum-norm",
            "seq_mean_token_sum_norm",
            "batch size global_batch_size (and loss_scale_factor)",
        ),
    ),
)

_LEGACY_SOURCE = (
    "verl ≤ 0.6 workers/actor/dp_actor.py update_policy: agg_loss without batch info on each "
    "micro-batch, then loss = policy_loss / gradient_accumulation"
)


def _legacy(name: str, mode: str, what: str) -> SplitRule:
    return SplitRule(
        name,
        mode,
        False,
        "micro",
        0,
        -1,
        f"each micro-batch normalises by its own {what}, then divides by the accumulation "
        "steps; the ranks' gradients are averaged",
        _LEGACY_SOURCE,
    )


VERL_LEGACY = Convention(
    name="verl_legacy",
    framework="verl (dp_actor)",
    versions="≤ 0.6",
    rules=(
        _legacy("token-mean", "token_mean", "token count"),
        _legacy("seq-mean-token-mean", "seq_mean_token_mean", "number of non-empty sequences"),
        _legacy("seq-mean-token-sum", "seq_mean_token_sum", "number of non-empty sequences"),
        _legacy("seq-mean-token-sum-norm", "token_sum_norm", "length scale L (Σ/L)"),
    ),
)

_TRL_SOURCE = (
    "TRL 1.16.0 trainer/grpo_trainer.py GRPOTrainer._compute_loss (loss_is_scaled_for_ga = "
    "True: the Trainer divides no further); accelerate's DDP averages the processes"
)


def _trl_local(name: str, mode: str, what: str, aliases: tuple[str, ...] = ()) -> SplitRule:
    return SplitRule(
        name,
        mode,
        True,
        "micro",
        0,
        -1,
        f"each micro-batch normalises by its own {what}, then divides by "
        "current_gradient_accumulation_steps; the processes' gradients are averaged",
        _TRL_SOURCE,
        aliases,
    )


TRL = Convention(
    name="trl",
    framework="TRL GRPOTrainer",
    versions="1.10–1.16, steps_per_generation = gradient_accumulation_steps",
    rules=(
        _trl_local("grpo", "seq_mean_token_mean", "number of rows (.mean() over B)", ("sapo",)),
        _trl_local("bnpo", "token_mean", "token count"),
        _trl_local("dr_grpo", "seq_mean_token_sum_norm", "rows × max_completion_length"),
        _trl_local("luspo", "seq_mean_token_sum", "number of rows (.mean() over B)"),
        SplitRule(
            "dapo",
            "token_mean",
            True,
            "step",
            1,
            0,
            "every micro-batch divides by num_items_in_batch (the generation batch's tokens, "
            "gathered over the processes) / num_processes · accumulation steps / "
            "steps_per_generation, which undoes the process average",
            _TRL_SOURCE,
            ("cispo", "vespo"),
        ),
    ),
)

OPENRLHF = Convention(
    name="openrlhf",
    framework="OpenRLHF",
    versions="0.11",
    rules=tuple(
        SplitRule(
            name,
            mode,
            False,
            "step",
            1,
            0,
            f"every micro-batch divides by the step's {what} / gas (utils/loss_utils.py "
            "_optimizer_step_loss_norm) and multiplies by dp_size; DeepSpeed's own 1/gas and "
            "rank average cancel both",
            "OpenRLHF 0.11.2 models/loss.py aggregate_loss, utils/loss_utils.py "
            "iter_grad_accum_global_norm, DeepSpeed engine backward",
        )
        for name, mode, what in (
            ("token-mean", "token_mean", "token count"),
            ("seq-mean-token-mean", "seq_mean_token_mean", "non-empty sequences"),
        )
    ),
)

MS_SWIFT = Convention(
    name="ms_swift",
    framework="ms-swift GRPO",
    versions="as reported in ms-swift issue 10117 (2026-09); not read from its code",
    rules=(
        SplitRule(
            "dapo",
            "token_mean",
            True,
            "step",
            1,
            -1,
            "every micro-batch divides by the step's token count as TRL's dapo does, and the "
            "loss is divided by the accumulation steps once more",
            "ms-swift issue 10117: dapo/cispo/fipo losses divided by the accumulation steps twice",
            ("cispo", "fipo"),
        ),
    ),
)

CONVENTIONS: dict[str, Convention] = {
    c.name: c for c in (VERL, VERL_LEGACY, TRL, OPENRLHF, MS_SWIFT)
}


def resolve_convention(text: str, mode: str) -> tuple[Convention, SplitRule]:
    """``"verl"`` (the setting that computes ``mode``) or ``"trl:bnpo"`` → the convention and
    its rule; errors name split.convention and list the valid values."""
    name, sep, setting = text.partition(":")
    convention = CONVENTIONS.get(name)
    if convention is None:
        raise GradlensError(
            "split.convention: " + unknown_name_message("convention", name, list(CONVENTIONS))
        )
    rule = convention.rule(setting) if sep else convention.for_mode(mode)
    return convention, rule


def convention_names() -> list[str]:
    """Every valid split.convention value, each setting named."""
    return [f"{c.name}:{name}" for c in CONVENTIONS.values() for r in c.rules for name in r.names]
