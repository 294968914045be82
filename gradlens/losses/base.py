"""The contract every loss fulfils, and the settings the losses share.

A loss is a function ``(TokenInputs, LossParams) -> LossTerms``: it returns its per-token loss
(so autograd can check it) and its closed-form coefficient g_t = ∂(per-token loss)/∂ℓ_t (so
the logit and lm_head gradients follow from the master identity ∂L/∂z_t = a_t·g_t·(e_y − π_t)
without a graph over the logits). Metadata (formula, coefficient, paper) lives beside the
function in a `LossSpec` so that ``gradlens losses`` and the docs read from one place.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from gradlens.containers import LossTerms, TokenInputs


@dataclass(frozen=True)
class LossParams:
    """Hyper-parameters shared by the clipped losses (losses.md §2.4 for the defaults).

    Attributes:
        eps_low: lower clip width: a token with A < 0 is clipped when r < 1 − eps_low.
        eps_high: upper clip width: a token with A > 0 is clipped when r > 1 + eps_high.
        dual_clip: c > 1 of dual-clip PPO, or None: a token with A < 0 is clipped when r > c.
        opsm_delta: δ of DeepSeek-V3.2's off-policy sequence mask, or None for no mask.
    """

    eps_low: float = 0.2
    eps_high: float = 0.28
    dual_clip: float | None = None
    opsm_delta: float | None = None


LossFn = Callable[[TokenInputs, LossParams], LossTerms]


@dataclass(frozen=True)
class LossSpec:
    """A registered loss: the function and the words that explain it.

    Attributes:
        name: registry key = YAML value = CLI name = test id.
        fn: the loss function.
        formula: the per-token loss that is minimised, in plain Unicode maths.
        coefficient: g_t = ∂(per-token loss)/∂ℓ_t.
        zero_when: when the gradient of a token is exactly zero.
        paper: where it comes from.
        regions: the region masks the loss reports (keys of ``LossTerms.regions``).
        post_formula: the seed post's closed form of |∂L/∂z_y| for one token, before the
            aggregation weight.
        uses_advantage: whether g_t scales with A (False for SFT); amplification relative
            to REINFORCE, |g_t|/|A_t|, is reported only for such losses.
    """

    name: str
    fn: LossFn
    formula: str
    coefficient: str
    zero_when: str
    paper: str
    regions: tuple[str, ...] = ()
    post_formula: str = "|g|·(1 − π_y)"
    uses_advantage: bool = True
