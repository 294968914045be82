"""The contract every loss fulfils, and the settings the losses share.

A loss is a function ``(TokenInputs, LossParams) -> LossTerms``: it returns its per-token loss
(so autograd can check it) and its closed-form per-token gradient g_t = ∂(per-token loss)/∂ℓ_t (so
the logit and lm_head gradients follow from the master identity ∂L/∂z_t = a_t·g_t·(e_y − π_t)
without a graph over the logits). Metadata (formula, g_t, paper) lives beside the
function in a `LossSpec` so that ``gradlens losses`` and the docs read from one place.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from gradlens.containers import LossTerms, TokenInputs
from gradlens.losses.aggregation import Aggregation


@dataclass(frozen=True)
class Correction:
    """One training–inference correction (docs/losses.md §2.12): a detached weight on g_t.

    Attributes:
        kind: token_tis, seq_tis, token_mis, seq_mis, icepop or geo_mask.
        low, high: its thresholds (None: no bound on that side).
        renormalize: the tokens it masks leave the aggregation's normaliser too, as verl's
            rejection sampling (``rollout_rs``) removes them from the response mask; only for
            the kinds that mask.
    """

    kind: str
    low: float | None = None
    high: float | None = None
    renormalize: bool = False


@dataclass(frozen=True)
class LossParams:
    """Hyper-parameters shared by the clipped losses (losses.md §2.4 for the defaults).

    Attributes:
        eps_low: lower clip width: a token with A < 0 is clipped when r < 1 − eps_low.
        eps_high: upper clip width: a token with A > 0 is clipped when r > 1 + eps_high.
        dual_clip: c > 1 of dual-clip PPO, or None: a token with A < 0 is clipped when r > c.
        opsm_delta: δ of DeepSeek-V3.2's off-policy sequence mask, or None for no mask.
        tau_pos, tau_neg: SAPO's gate temperatures for A > 0 and for A ≤ 0 (paper: 1.0, 1.05).
        cispo_eps_low, cispo_eps_high: CISPO's IS-weight clip clip(r, 1 − low, 1 + high)
            (verl/slime parametrisation; low = 10 disables the lower bound).
        cispo_cap: the absolute cap ε_max of ``cispo_cap``, min(r, ε_max) (TRL's
            ``epsilon_high`` under ``loss_type="cispo"``; ScaleRL recommends 5).
        kl_estimator: ``grpo``'s KL estimator: k1, k2, k3 (= verl ``low_var_kl``) or
            ``unbiased`` (DeepSeek-V3.2 eq. 7, gradient through the ratio).
        kl_coef: β, the weight of ``grpo``'s KL penalty (DeepSeekMath: 0.04).
        minirl_cap: MiniRL's truncation threshold of the token IS weight (paper: 5).
        minirl_truncation: which reading of MiniRL's truncation (losses.md trap A1):
            ``literal`` truncates sg[π_θ/μ_old]; ``decoupled`` truncates only π_old/μ_old.
        entropy_coef: c_H of the entropy bonus −c_H·agg_t H_t, added to every loss (0: off).
        corrections: training–inference corrections composed with every loss (detached
            weights or masks on g_t; `gradlens.losses.corrections`).

    The token aggregation is not a loss setting: it travels as an `Aggregation`.
    """

    eps_low: float = 0.2
    eps_high: float = 0.28
    dual_clip: float | None = None
    opsm_delta: float | None = None
    tau_pos: float = 1.0
    tau_neg: float = 1.05
    cispo_eps_low: float = 10.0
    cispo_eps_high: float = 0.28
    cispo_cap: float = 5.0
    kl_estimator: str = "k3"
    kl_coef: float = 0.04
    minirl_cap: float = 5.0
    minirl_truncation: str = "literal"
    entropy_coef: float = 0.0
    corrections: tuple[Correction, ...] = ()


LossFn = Callable[[TokenInputs, LossParams], LossTerms]
# A loss that aggregates itself (user and framework functions) also receives the aggregation.
SelfAggregatingFn = Callable[[TokenInputs, LossParams, Aggregation], LossTerms]


@dataclass(frozen=True)
class LossSpec:
    """A registered loss: the function and the words that explain it.

    Attributes:
        name: registry key = YAML value = CLI name = test id.
        fn: the loss function; for a loss that aggregates itself, ``aggregating_fn`` instead.
        formula: the per-token loss that is minimised, in plain Unicode maths.
        grad_formula: g_t = ∂(per-token loss)/∂ℓ_t, before the aggregation weight.
        zero_when: when the gradient of a token is exactly zero.
        paper: where it comes from.
        regions: the region masks the loss reports (keys of ``LossTerms.regions``).
        post_formula: the seed post's closed form of |∂L/∂z_y| for one token, before the
            aggregation weight.
        uses_advantage: whether g_t scales with A (False for SFT); amplification relative
            to REINFORCE, |g_t|/|A_t|, is reported only for such losses.
        needs: optional batch inputs the loss reads (``rollout_logp``, ``ref_logp``); when the
            batch lacks one the loss falls back to ℓ_old, and ``compare`` says so in findings.
        aggregating_fn: a function that aggregates itself (user and framework losses): it
            receives the run's `Aggregation` and returns L as ``per_token`` summing to it, with
            ``self_aggregated`` set.
        handles_corrections: a loss that aggregates itself and applies ``loss.corrections``
            its own way (verl's and OpenRLHF's losses pass them to the framework's code).
    """

    name: str
    fn: LossFn | None
    formula: str
    grad_formula: str
    zero_when: str
    paper: str
    regions: tuple[str, ...] = ()
    post_formula: str = "|g|·(1 − π_y)"
    uses_advantage: bool = True
    needs: tuple[str, ...] = ()
    aggregating_fn: SelfAggregatingFn | None = None
    handles_corrections: bool = False

    def terms(self, inputs: TokenInputs, params: LossParams, aggregation: Aggregation) -> LossTerms:
        """The loss's terms on ``inputs`` (the aggregation reaches only losses that use it)."""
        if self.aggregating_fn is not None:
            return self.aggregating_fn(inputs, params, aggregation)
        assert self.fn is not None, f"loss {self.name!r} has no function"
        return self.fn(inputs, params)
