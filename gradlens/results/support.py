"""The rollout's sampling support: the kept sets K_t of top-p / top-k and what replaying them
changes (`gradlens.diagnostics.support`)."""

from __future__ import annotations

from pydantic import Field

from gradlens.results.base import Result


class SupportRatio(Result):
    """One ratio without and with the kept sets replayed: its mean and its clip fraction."""

    name: str = Field(description="policy_ratio (π_θ/π_old) or sampler_ratio (π_θ/μ̃)")
    formula_full: str = Field(description="the ratio over the whole vocabulary")
    formula_kept: str = Field(description="the ratio with the kept sets replayed")
    mean_full: float | None
    mean_kept: float | None
    clipfrac_full: float | None = Field(
        description="share of tokens A>0 ∧ r>1+eps_high or A<0 ∧ r<1−eps_low (verl "
        "actor/pg_clipfrac's rule), without replay"
    )
    clipfrac_kept: float | None = Field(description="the same share, with the kept sets replayed")


class KeptToken(Result):
    """A token whose kept set holds little of π_θ's mass (where replay changes the most)."""

    sequence: int
    position: int
    token: int
    kept: int = Field(description="|K_t|")
    mass: float = Field(description="S_t = π_θ's mass of K_t")
    log_mass: float = Field(description="log S_t, the bias of an unreplayed log-prob (nats)")


class SupportReport(Result):
    """The kept sets K_t the rollout sampled from (top-p / top-k), over the valid tokens.

    S_t = Σ_{v∈K_t} π_θ,t(v). Without replay every log-prob of the sampled token is log S_t
    larger than that of the distribution the token was drawn from (π̃ = π on K_t, renormalised):
    log π̃(y) = log π(y) − log S_t.
    """

    rule: str = Field(description="how K_t was chosen: top-p, top-k, a batch file's kept ids")
    replayed: bool = Field(description="loss.sampling_support is kept: the losses use π̃")
    tokens: int
    kept_mean: float | None = Field(description="mean |K_t|")
    kept_min: int | None
    kept_max: int | None
    mass_mean: float | None = Field(description="mean S_t of π_θ")
    mass_min: float | None
    mass_p05: float | None
    mass_p50: float | None
    log_mass_mean: float | None = Field(description="mean log S_t of π_θ (nats, ≤ 0)")
    old_mass_mean: float | None = Field(None, description="mean S_t of π_old, when recorded")
    rollout_mass_mean: float | None = Field(
        None, description="mean S_t of the rollout pass μ, when recorded"
    )
    ratios: list[SupportRatio] = Field(default_factory=list)
    lowest: list[KeptToken] = Field(
        default_factory=list, description="the tokens with the smallest S_t"
    )
