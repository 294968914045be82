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
        batch_normalize: the weight is divided by its batch mean (over the valid tokens, or the
            valid sequences for a sequence-level weight), as verl's
            ``rollout_is_batch_normalize``; only for the kinds whose weight is an IS ratio.
    """

    kind: str
    low: float | None = None
    high: float | None = None
    renormalize: bool = False
    batch_normalize: bool = False


@dataclass(frozen=True)
class Distill:
    """The run's distillation term (docs/losses.md §2.29, `gradlens.losses.distill`): a
    divergence between the student π_t and a teacher q_t over the whole distribution, added to
    every loss as coef·Σ_t a_t·D_t. Its logit gradient is dense and zero-sum, not of the c-form.

    Attributes:
        divergence: forward_kl (KL(q‖π)), reverse_kl (KL(π‖q)) or jsd (TRL GKD's β-JSD).
        form: full (every vocabulary entry; needs the teacher's hidden states and lm_head) or
            top_k (the sums run over the teacher's top-k ids K_t only, unrenormalised, as verl's
            ``forward_kl_topk``; from stored top-k log-probs, or the pair's top ``top_k``).
        coef: λ, the weight of the term (verl ``distillation_loss_coef``).
        beta: β of jsd, in [0, 1]; 0 and 1 are TRL's forward and reverse KL.
        top_k: K when the top-k form is taken from a teacher hidden/weight pair.
        log_prob_min_clamp: verl's floor on log π and log q before the divergence (log π below
            it carries no gradient); None: none.
    """

    divergence: str = "forward_kl"
    form: str = "full"
    coef: float = 1.0
    beta: float = 0.5
    top_k: int = 8
    log_prob_min_clamp: float | None = None


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
        distill: the distillation term added to every loss (`Distill`), or None: none.
        bypass_mode: verl's bypass mode: π_old := μ (the rollout log-probs stand in for the
            recomputed old policy) and every correction's ratio is sg[π_θ]/μ instead of π_old/μ.

    The token aggregation is not a loss setting: it travels as an `Aggregation`.

    The settings of the losses of docs/losses.md §2.14–§2.27 (each module's docstring has the
    maths) and of the top-entropy token selection (§2.28):
        dppo_tv_low, dppo_tv_high: δ of DPPO's binary-TV mask on π_θ(y) − π_old(y) (verl's
            example script: 0.15). dppo_kl_low, dppo_kl_high: δ of the binary-KL mask (0.05).
        dppo_cap: C of DPPO's truncated weight min(r, C), or None for no truncation (verl
            reads ``clip_ratio_c``: 3.0 from actor.yaml; the example script sets 10000).
        prime_mask_low, prime_mask_high: prime-rl's DPPO-TV thresholds on π_θ(y) − μ(y) (0.2).
        prime_kl_tau: τ_KL of prime-rl's squared log-ratio term τ_KL·(ℓ − ℓ_μ)² (1e-3).
        ipo_threshold: prime-rl's IPO symmetric mask |π_θ(y) − μ(y)| > threshold (0.1).
        m2po_threshold: τ_M2 of M2PO's second-moment mask (AReaL example: 0.04).
        aspo_eps_low_entropy, aspo_eps_high_entropy: ASPO's clip width for the tokens at or
            below / above the per-sequence entropy quantile (Archer2.0: 0.2 and 0.4).
        aspo_entropy_quantile: that per-sequence quantile (0.8).
        aspo_clip_c_neg, aspo_clip_c_pos: ASPO's dual-clip constants c⁻ and c⁺ (3.0 each).
        gppo_beta1, gppo_beta2: CE-GPPO's β₁ (A < 0, r < 1 − eps_low) and β₂ (A > 0,
            r > 1 + eps_high): the bounded gradient a clipped token keeps (0.25, 1.0).
        clip_cov_ratio, clip_cov_lb, clip_cov_ub: Clip-Cov's share of tokens to switch off and
            its covariance band (lb, ub) (verl: 2e-4, 1, 5).
        selection_seed: seed of Clip-Cov's random choice among the candidate tokens.
        kl_cov_ratio, kl_cov_coef: KL-Cov's share of tokens penalised and the coefficient k of
            k·|ℓ − ℓ_old| (verl actor.yaml: 2e-4 and ppo_kl_coef = 0.1).
        gmpo_eps_low, gmpo_eps_high: GMPO's token clip in log space, (−low, high) (paper and
            TRL: 0.4).
        topr_pos_weight, topr_neg_weight: TOPR's weights of the positive and negative parts (1).
        dro_beta: β of DRO's (Kimi-1.5's τ) penalty (β/2)(ℓ − ℓ_old)² (ROLL's kimi15_tau: 0.1).
        vespo_k_pos, vespo_lambda_pos, vespo_k_neg, vespo_lambda_neg: VESPO's (k, λ) for A ≥ 0
            and A < 0 (TRL: (2, 3) and (3, 2)).
        real_tau: REAL's temperature τ (ms-swift: 0.5).
        fipo_decay_rate: FIPO's half-life in tokens, γ = 2^(−1/decay_rate) (32).
        fipo_clip_range, fipo_clip_high_only: FIPO's weight clip [1, 1 + range] (high only) or
            [1 − range, 1 + range]; None: no clip (0.2, True).
        fipo_safety_threshold: r above which an A < 0 token's FIPO weight is clamped to
            [0.8, 1]; None: off (4.0).
        top_entropy_quantile: ρ of the top-entropy token selection composed with every loss:
            only the tokens with H_t ≥ the batch's (1 − ρ)-quantile keep their policy
            gradient and their entropy bonus (TRL ``top_entropy_quantile``); 1: off.
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
    distill: Distill | None = None
    bypass_mode: bool = False
    # --- the losses of docs/losses.md §2.14–§2.27 and the top-entropy token selection (§2.28);
    # every default keeps the behaviour of the losses above unchanged. Each has a twin with the
    # same name and default in `gradlens.config.LossConfig` (`LossConfig.params()` maps them).
    dppo_tv_low: float = 0.15
    dppo_tv_high: float = 0.15
    dppo_kl_low: float = 0.05
    dppo_kl_high: float = 0.05
    dppo_cap: float | None = 3.0
    prime_mask_low: float = 0.2
    prime_mask_high: float = 0.2
    prime_kl_tau: float = 1e-3
    ipo_threshold: float = 0.1
    m2po_threshold: float = 0.04
    aspo_eps_low_entropy: float = 0.2
    aspo_eps_high_entropy: float = 0.4
    aspo_entropy_quantile: float = 0.8
    aspo_clip_c_neg: float = 3.0
    aspo_clip_c_pos: float = 3.0
    gppo_beta1: float = 0.25
    gppo_beta2: float = 1.0
    clip_cov_ratio: float = 2e-4
    clip_cov_lb: float = 1.0
    clip_cov_ub: float = 5.0
    selection_seed: int = 0
    kl_cov_ratio: float = 2e-4
    kl_cov_coef: float = 0.1
    gmpo_eps_low: float = 0.4
    gmpo_eps_high: float = 0.4
    topr_pos_weight: float = 1.0
    topr_neg_weight: float = 1.0
    dro_beta: float = 0.1
    vespo_k_pos: float = 2.0
    vespo_lambda_pos: float = 3.0
    vespo_k_neg: float = 3.0
    vespo_lambda_neg: float = 2.0
    real_tau: float = 0.5
    fipo_decay_rate: float = 32.0
    fipo_clip_range: float | None = 0.2
    fipo_clip_high_only: bool = True
    fipo_safety_threshold: float | None = 4.0
    top_entropy_quantile: float = 1.0


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
            ``entropy`` (per-token H_t, both engines provide it) and ``groups`` (prompt groups;
            a batch without them is an error) are listed here too.
        coupling: how far the inputs that decide one token's g_t reach: ``token`` (its own),
            ``sequence`` (its sequence: GSPO's ratio, FIPO's future), ``group`` (its prompt
            group: REAL) or ``batch`` (every token of the batch: Clip-Cov, KL-Cov, M2PO). The
            sweep lays its points out by it (docs/sweep.md §1).
        correction_note: what composing ``loss.corrections`` with this loss means when it is
            not what the framework does (it already folds in the training–inference ratio);
            ``compare`` repeats it in the findings when corrections are set.
        rule_words: (region, what it means) for the regions whose meaning differs from the
            shared words of `gradlens.report.sweep_labels.RULE_TEXT` (DPPO's ``clip_upper`` is
            a probability difference, not a ratio); the sweep's table and figures use them.
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
    coupling: str = "token"
    correction_note: str = ""
    rule_words: tuple[tuple[str, str], ...] = ()
    aggregating_fn: SelfAggregatingFn | None = None
    handles_corrections: bool = False

    def terms(self, inputs: TokenInputs, params: LossParams, aggregation: Aggregation) -> LossTerms:
        """The loss's terms on ``inputs`` (the aggregation reaches only losses that use it)."""
        if self.aggregating_fn is not None:
            return self.aggregating_fn(inputs, params, aggregation)
        assert self.fn is not None, f"loss {self.name!r} has no function"
        return self.fn(inputs, params)
