"""gradlens inside verl: ``gradlens_<name>`` around every registered verl policy loss.

Load it in verl's workers and pick a wrapped loss::

    actor_rollout_ref.model.external_lib=gradlens.integrations.verl
    actor_rollout_ref.actor.policy_loss.loss_mode=gradlens_vanilla      # or gradlens_gspo, ...

(verl imports ``external_lib`` with ``importlib.import_module`` in each worker when it builds
the model config, before the actor looks its loss up; ``VERL_USE_EXTERNAL_MODULES=
gradlens.integrations.verl`` does the same at ``import verl``.) Importing the module registers,
for every loss already in ``verl.trainer.ppo.core_algos.POLICY_LOSS_REGISTRY``, a wrapper
``gradlens_<name>`` with the same signature (`register_all`; idempotent; call it again for
losses registered later). The wrapper

1. calls the original loss with the same arguments and returns its loss unchanged (the same
   tensor: the trainer's backward is untouched);
2. takes c_t = ∂pg_loss/∂log_prob_t exactly, by ``torch.autograd.grad(pg_loss, log_prob,
   retain_graph=True)`` (the graph from pg_loss back to log_prob is elementwise over [B, T]:
   cheap; the model's graph behind log_prob is not traversed). c_t includes verl's aggregation
   weights (``loss_agg_mode``, ``global_batch_info``): it is the micro-batch's contribution to
   the logit gradient, c_t·(e_y − π_t), before data-parallel averaging (÷ dp_size);
3. adds the c_t-level diagnostics to the metrics dict verl returns (`verl_metrics`):

   ``gradlens/c_abs_max``, ``gradlens/c_abs_mean``, ``gradlens/c_sum``
       the coefficient statistics over the valid tokens;
   ``gradlens/c_zero_frac``
       share of valid tokens with no gradient at all (c_t = 0);
   ``gradlens/actor/pg_clipfrac``, ``gradlens/actor/pg_clipfrac_lower``
       the tokens without gradient, split as verl names its clip shares: A > 0 with r > 1 or
       A < 0 with r < 1 (the ε-clip: verl's ``actor/pg_clipfrac``), and A < 0 with r > 1
       (the dual clip: verl's ``actor/pg_clipfrac_lower``); r = exp(log_prob − old_log_prob).
       Unlike verl's own, these count what the loss actually did to the gradient, whatever
       loss is wrapped (clip_cov, kl_cov, a rejection mask);
   ``gradlens/zero_adv_frac``
       share of valid tokens with A = 0 (no signal: a group whose rewards were all equal);
   ``gradlens/adv_pos_share``, ``gradlens/adv_neg_share``
       share of the update carried by tokens with A > 0 and A < 0: Σ‖∂L/∂z_t‖ over those
       tokens / Σ over all (the per-token logit-gradient norms below);
   ``gradlens/sampled_row_grad_max``, ``gradlens/sampled_row_grad_mean``
       |∂L/∂z_y| = |c_t|·(1 − π_y) of the sampled row, π_y = exp(log_prob);
   ``gradlens/logit_grad_norm_max``, ``gradlens/logit_grad_norm_mean``
       the per-token logit-gradient norm ‖c_t(e_y − π_t)‖₂ = |c_t|·√(1 − 2π_y + Σ_j π_j²).
       Exact where Σπ² is known: verl computes it with ``actor.calculate_sum_pi_squared=True``
       (``sum_pi_squared`` in the batch), and `gradlens_ppo_loss` passes it on (`sum_pi_squared`
       for any caller). Without it, Σπ² lies in [π_y², π_y² + (1 − π_y)²] and the norm in
       [|c|(1 − π_y), √2·|c|(1 − π_y)]: ``gradlens/logit_grad_norm_bound`` = "lower" says the
       reported norms are the lower bound, "exact" (1.0) that Σπ² was used.

The wrapper sees the log-probs, not the hidden states, so the lm_head-level diagnostics
(‖∂L/∂W‖, the other rows) are out of its reach: `gradlens.diagnose` or a batch file give them.
The ``.item()`` calls synchronise with the device once per metric, once per micro-batch.

Supported: verl 0.7 to 0.9 (the policy-loss signature with ``config``); tested with 0.9.1.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch
from torch import Tensor
from verl.trainer.ppo import core_algos

PREFIX = "gradlens_"
_SUM_PI_SQUARED: ContextVar[Tensor | None] = ContextVar("gradlens_sum_pi_squared", default=None)
last_call: dict[str, Any] = {}  # the latest wrapper call's c_t and inputs (tests, notebooks)


@contextmanager
def sum_pi_squared(value: Tensor | None) -> Iterator[None]:
    """Hand the wrapped losses called inside this block verl's Σπ² [B, T] (exact norms)."""
    token = _SUM_PI_SQUARED.set(value)
    try:
        yield
    finally:
        _SUM_PI_SQUARED.reset(token)


def _share(part: Tensor, whole: Tensor) -> float:
    return float(part.sum() / whole.sum()) if float(whole.sum()) > 0 else 0.0


def verl_metrics(
    c: Tensor,
    log_prob: Tensor,
    old_log_prob: Tensor,
    advantages: Tensor,
    mask: Tensor,
    sum_pi_sq: Tensor | None = None,
) -> dict[str, float]:
    """The c_t-level diagnostics (module docstring) over the valid tokens; {} when none."""
    m = mask.bool()
    if not bool(m.any()):
        return {}
    d = torch.float64
    cm = c.detach()[m].to(d)
    lp = log_prob.detach()[m].to(d)
    py = lp.exp()
    ratio = (lp - old_log_prob.detach()[m].to(d)).exp()
    adv = advantages.detach()[m].to(d)
    zero = cm == 0
    sampled = cm.abs() * (1.0 - py)
    if sum_pi_sq is None:
        norms, exact = sampled, 0.0  # the lower bound: Σπ² = π_y²
    else:
        spread = (1.0 - 2.0 * py + sum_pi_sq.detach()[m].to(d)).clamp(min=0.0)
        norms, exact = cm.abs() * spread.sqrt(), 1.0
    n = float(m.sum())
    return {
        "gradlens/c_abs_max": float(cm.abs().max()),
        "gradlens/c_abs_mean": float(cm.abs().mean()),
        "gradlens/c_sum": float(cm.sum()),
        "gradlens/c_zero_frac": float(zero.sum()) / n,
        "gradlens/actor/pg_clipfrac": float(
            (zero & (((adv > 0) & (ratio > 1)) | ((adv < 0) & (ratio < 1)))).sum()
        )
        / n,
        "gradlens/actor/pg_clipfrac_lower": float((zero & (adv < 0) & (ratio > 1)).sum()) / n,
        "gradlens/zero_adv_frac": float((adv == 0).sum()) / n,
        "gradlens/adv_pos_share": _share(norms * (adv > 0), norms),
        "gradlens/adv_neg_share": _share(norms * (adv < 0), norms),
        "gradlens/sampled_row_grad_max": float(sampled.max()),
        "gradlens/sampled_row_grad_mean": float(sampled.mean()),
        "gradlens/logit_grad_norm_max": float(norms.max()),
        "gradlens/logit_grad_norm_mean": float(norms.mean()),
        "gradlens/logit_grad_norm_exact": exact,
    }


def wrap(inner_name: str) -> Callable[..., tuple[Tensor, dict[str, Any]]]:
    """``gradlens_<inner_name>``: the registered verl loss, plus the gradlens metrics."""
    inner = core_algos.get_policy_loss_fn(inner_name)

    @functools.wraps(inner)
    def gradlens_loss(
        old_log_prob: Tensor,
        log_prob: Tensor,
        advantages: Tensor,
        response_mask: Tensor,
        loss_agg_mode: str = "token-mean",
        config: Any = None,
        rollout_is_weights: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Any]]:
        pg_loss, metrics = inner(
            old_log_prob,
            log_prob,
            advantages,
            response_mask,
            loss_agg_mode=loss_agg_mode,
            config=config,
            rollout_is_weights=rollout_is_weights,
        )
        if not (torch.is_grad_enabled() and log_prob.requires_grad and pg_loss.requires_grad):
            return pg_loss, metrics
        (c,) = torch.autograd.grad(pg_loss, log_prob, retain_graph=True, allow_unused=True)
        if c is None:  # the loss does not depend on log_prob here (e.g. every token masked)
            c = torch.zeros_like(log_prob)
        adv = advantages if advantages.shape == log_prob.shape else advantages[:, None]
        adv = adv.expand_as(log_prob)
        spi = _SUM_PI_SQUARED.get()
        extra = verl_metrics(c, log_prob, old_log_prob, adv, response_mask, spi)
        last_call.clear()
        last_call.update(c=c.detach(), inner=inner_name, metrics=extra)
        return pg_loss, {**metrics, **extra}

    gradlens_loss.__name__ = gradlens_loss.__qualname__ = PREFIX + inner_name
    return gradlens_loss


def register_all() -> list[str]:
    """Register ``gradlens_<name>`` for every verl policy loss registered so far; the new names."""
    added = []
    for name in list(core_algos.POLICY_LOSS_REGISTRY):
        if name.startswith(PREFIX) or PREFIX + name in core_algos.POLICY_LOSS_REGISTRY:
            continue
        core_algos.register_policy_loss(PREFIX + name)(wrap(name))
        added.append(PREFIX + name)
    return added


def gradlens_ppo_loss(config: Any, model_output: Any, data: Any, dp_group: Any = None) -> Any:
    """verl's ``verl.workers.utils.losses.ppo_loss``, with the batch's ``sum_pi_squared`` (verl's
    ``actor.calculate_sum_pi_squared``) handed to the wrapped losses: exact logit-gradient
    norms. Σπ² is the one verl computed with the old log-probs: exact on-policy (the first
    pass over a batch), the old policy's after that."""
    from verl.workers.utils.losses import no_padding_2_padding, ppo_loss

    spi = None
    if "sum_pi_squared" in data:
        spi = data["sum_pi_squared"]
        if getattr(spi, "is_nested", False):
            spi = no_padding_2_padding(spi, data)
        elif hasattr(spi, "to_padded_tensor"):
            spi = spi.to_padded_tensor()
    with sum_pi_squared(spi):
        return ppo_loss(config, model_output, data, dp_group)


REGISTERED = register_all()
