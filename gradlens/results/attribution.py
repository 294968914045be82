"""The attribution section of one loss's report: which sequences, tokens, loss terms and regions
carry the lm_head update, and what one step does to the entropy (docs/attribution.md).

Shares are ⟨part, G⟩/‖G‖² of G = ∂L/∂W: they sum to 1 over any partition of the tokens (a token
or sequence whose share is negative pulls against the rest). They are signed fractions, not
confined to [0, 1].
"""

from __future__ import annotations

from pydantic import Field

from gradlens.results.base import Result


class AttributedSequence(Result):
    """One sequence's part of the lm_head update."""

    sequence: int
    share: float | None = Field(description="⟨G_i, G⟩/‖G‖², G_i = Σ_{t∈i} ∂L/∂z_t h_tᵀ")
    norm: float | None = Field(description="‖G_i‖_F, the sequence's own lm_head gradient")
    tokens: int = Field(description="its valid tokens")
    advantage: float | None = Field(description="mean A over its valid tokens")
    text: str | None = Field(None, description="its valid tokens decoded (a tokenizer is known)")


class AttributedToken(Result):
    """One token's part of the lm_head update."""

    sequence: int
    position: int
    token: int
    share: float | None = Field(description="⟨g_t h_tᵀ, G⟩/‖G‖² = g_tᵀ G h_t/‖G‖²")
    norm: float | None = Field(description="‖g_t h_tᵀ‖_F = ‖∂L/∂z_t‖·‖h_t‖")
    advantage: float
    prob: float | None = Field(description="π_θ(y)")
    ratio: float | None = Field(description="r = π_θ(y)/π_old(y)")
    region: str = Field(description="the first clip/mask region it is in, or kept")
    text: str | None = Field(None, description="the token decoded (a tokenizer is known)")
    context: str | None = Field(
        None, description="the tokens around it decoded, the token itself in «»"
    )


class GroupShares(Result):
    """Shares of one partition of the valid tokens (they sum to 1), and its token counts (for
    the loss components, which split every token: the tokens whose coefficient of that term is
    not 0)."""

    shares: dict[str, float | None]
    tokens: dict[str, int]


class EntropyChange(Result):
    """First-order change of the mean entropy of the batch's tokens under one step of size η,
    per unit η: the mean over tokens of dH_t/dη at η = 0, and its parts by the sign of the
    token's advantage (summing to it)."""

    lm_head: float | None = Field(
        description="one SGD step on the lm_head alone, ΔW = −η·∂L/∂W (cross-token effects "
        "included): mean_t e_t, e_t = Σ_v π_tv(log π_tv + H_t)(G h_t)_v"
    )
    logit: float | None = Field(
        description="a step on each token's logits, Δz_t = −η·∂L/∂z_t: mean_t ∂L/∂z_t·d_t, "
        "d = π(log π + H)"
    )
    lm_head_by_sign: dict[str, float | None]
    logit_by_sign: dict[str, float | None]


class SharePoints(Result):
    """Per-token points of the attribution figure: π_θ(y), share and advantage of each token
    (every token up to a limit, else the largest |share| ones, in token order)."""

    total: int = Field(description="valid tokens in the batch")
    prob: list[float | None]
    share: list[float | None]
    advantage: list[float]


class Attribution(Result):
    """Exact attribution of one loss's lm_head gradient G = ∂L/∂W (docs/attribution.md)."""

    grad_norm_sq: float | None = Field(description="‖G‖²_F, the shares' denominator")
    share_sum: float | None = Field(
        description="Σ_t share_t, 1 up to rounding (a check of the per-token shares against ‖G‖²)"
    )
    sequences_to_half: int | None = Field(
        description="the fewest sequences (largest shares first) whose shares reach 1/2"
    )
    sequences_to_half_share: float | None = Field(description="the shares of those sequences")
    top_sequences: list[AttributedSequence] = Field(description="largest |share| first")
    top_tokens: list[AttributedToken] = Field(description="largest |share| first")
    groups: dict[str, GroupShares] = Field(
        description="advantage_sign, component (policy, kl, entropy_bonus), region, prob_bucket "
        "(π_θ(y)), position (quarters of each completion)"
    )
    entropy: EntropyChange
    points: SharePoints
