"""Staleness: N optimizer steps on the rollout batch, so that π_θ ≠ π_old for real.

In PPO-style training the policy takes several optimizer steps (mini-batches, epochs) on one
rollout batch; from the second step on, the parameters θ that compute π_θ have moved away from
the θ_old that computed π_old, and the ratio r = π_θ/π_old leaves 1. Here:

    θ_0 = θ_old;  for k = 0 … N−1:  θ_{k+1} = optimizer step on L_stale(θ_k)

with the optimizer (sgd, adam, adamw: `gradlens.sources.optimizers`) and loss of
``source.stale``; the loss is any registered loss, aggregated as in the run
(``loss.aggregation``), and written once in `gradlens.grads.objective`. π_old is the training
pass at θ_0 (so at N = 0 the ratio is exactly 1); the log-probs at every θ_k, k = 0 … N, are
recorded (`StalenessRecord`), and the report turns them into ratio statistics and clip fractions.

How far the steps go: a learning rate means a different distance on every model — Adam moves
each parameter by about lr per step, and what that does to the log-probs grows with width and
depth (5e-5 moves the 2M-parameter built-in model by a KL of 0.015 in two steps and a
135M-parameter one by a KL of about 1). So with ``target_kl`` (the default) the learning rate
is searched. After step k the KL of π_θk against π_old, the k3 estimate mean(r − 1 − log r)
over the completion tokens (the staleness table's ``kl_k3``), is compared with the goal
k/N·target_kl; when it lies outside a factor `TARGET_BAND` of it, step k is redone with
lr' = lr·s (`StaleOptimizer.rescale`, no copy of the weights), at most `MAX_PROBES` times per
step; the next step starts from the last learning rate. The scale s comes from the tokens'
log-ratios (`LearningRateSearch`): a step moves the parameters along one direction u by lr
(θ_k = θ_{k−1} + lr·u; AdamW's decay is linear in lr too), so to first order each token's
log-ratio is a straight line in the step size,

    log r_t(s) ≈ a_t + s·(d_t − a_t),   a_t = log r_t at θ_{k−1},  d_t = log r_t just measured,

and s solves mean_t k3(log r_t(s)) = goal (bisection; k3 is convex in s and k3(a) < goal). The
k3 of a large log-ratio grows far faster than its square (e^5 − 6 ≈ 142 against 5²/2 = 12.5),
which the tokens show and a power law of the mean KL does not; where no s reaches the goal on
that line, s comes from KL ∝ s^slope, slope 2 at the first probe (the KL of a small step is
quadratic in its size), then the slope the last two probes measured. A probe costs one
forward, and an accepted one is the next step's own forward. A step whose update is zero
(every advantage 0) is not probed; one whose KL is exactly 0 from a gradient that is not zero
(θ + lr·u rounded back to θ) is redone at the largest scale; one that made the log-probs
non-finite stops the run (`check_finite`). With ``target_kl: null`` the steps take ``lr`` as given.

The first step's learning rate is the user's guess, and a guess made for another model size is
often off by 10× or more (5e-5 gives a 135M-parameter model 49× the goal), so that step is
searched first on a subset (`subset_rows`: a quarter of each prompt group's completions, so
that every prompt is represented), by forwards without autograd that cost a quarter to a half
of the batch's, until the subset's KL lies within `SUBSET_BAND` (the band squared: a quarter
of the tokens estimates the batch's KL only roughly); then the whole batch's forward checks it
as above and redoes the step if the whole batch is still outside the band. The later steps
start from `next_lr`, which is usually within the band at once, so they are not searched on a
subset.

Memory: the steps hold the optimizer state (Adam: two tensors the size of the weights, one when
N ≤ 2: `gradlens.sources.optimizers`), so the backward recomputes the transformer blocks
(activation checkpointing, `gradlens.sources.forward.checkpointed_blocks`: one more forward per
step; with ``grad_dtype`` bfloat16, that recomputation runs under autocast,
`gradlens.sources.autocast_recompute`, and the lm_head's backward products take bf16 operands
too, `gradlens.sources.lowered_product`: the backward's products in bf16, every forward exact) and,
when the batch goes through the model in one micro-batch, each parameter is updated
as soon as its gradient is complete (`StaleOptimizer.in_backward`), so the whole gradient never
exists at once; with tied embeddings the input embedding's gradient is added into the lm_head's in
place, as the rows it looked up (`gradlens.sources.tied_gradient`), not as another [V, H]
tensor; the [M, V] logits are not kept beside their log-softmax, and the pages freed since the
last step go back to the system before each step's backward. A batch too large for
the memory budget goes through in micro-batches (`gradlens.sources.microbatch`) whose gradients
accumulate before the update; ℓ at θ_k then comes from a forward without autograd first, so
that each micro-batch's loss is the whole batch's. The last forward, at θ_N, records the
transformer blocks' inputs when the batch goes through in one micro-batch (`StaleResult.tape`),
so that the whole-model gradients at θ_N replay it instead of running the blocks again
(`gradlens.sources.blockwise.replayed_blocks`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from gradlens.config import DTYPE_NAMES_OF, StaleConfig
from gradlens.containers import Batch, BlockTape, Sequences, StalenessRecord, StalePoint
from gradlens.errors import GradlensError
from gradlens.grads import (
    PolicyPass,
    objective,
    on_grid,
    policy_entropy,
    policy_pass,
    reads_entropy,
)
from gradlens.logits import compute_logits, kept_entries
from gradlens.losses import Aggregation, LossParams, LossSpec
from gradlens.memory import release_free_memory
from gradlens.progress import report
from gradlens.results import ModelPass
from gradlens.sources.blockwise import BlockwiseUnsupported, taped_blocks
from gradlens.sources.forward import (
    checkpointed_blocks,
    final_hidden,
    grid_with,
    head_weight,
)
from gradlens.sources.lowered_product import lowered_logits
from gradlens.sources.microbatch import (
    MicroBatchPlan,
    checkpointed_bytes,
    loss_tokens,
    plan_micro_batches,
    probe,
)
from gradlens.sources.native_dtype import native_bf16
from gradlens.sources.optimizers import StaleOptimizer
from gradlens.sources.shared_prefix import pass_positions
from gradlens.sources.tied_gradient import TiedHead, tied_gradient_in_place

TARGET_BAND = 1.5  # a step is accepted when its KL is within this factor of the goal
MAX_PROBES = 4  # redos of one step at most (on the whole batch; as many again on the subset)
SUBSET_SHARE = 4  # the first step's learning rate is searched on ≥ 1/SUBSET_SHARE of the batch
# the subset's search stops within this factor of the goal: a quarter of the tokens estimates
# the batch's KL only roughly, and the whole batch's forward decides within TARGET_BAND anyway
SUBSET_BAND = TARGET_BAND**2
SLOPE_LIMITS = (0.5, 4.0)  # the measured log KL / log lr slope, clamped
SCALE_LIMITS = (1 / 30, 30.0)  # one probe changes the learning rate by at most this factor
LINE_ITERATIONS = 40  # bisection steps of `line_scale`: s to a relative 2^-40 of the range


@dataclass(frozen=True)
class StaleResult:
    record: StalenessRecord
    old_logp: Tensor  # [N, T] log π_old(y_t): the training pass at θ_0
    hidden: Tensor  # [N, T, H] h_t/T at θ_N (detached), for the batch
    old_kept_log_mass: Tensor | None = None  # [N, T] log S^old_t of the kept sets, if given
    tape: BlockTape | None = None  # the blocks of the forward at θ_N (one micro-batch), recorded
    # s: the bytes one sequence's forward with autograd keeps (`probe`, at θ_0), when measured
    sequence_bytes: int | None = None


class LearningRateSearch:
    """The learning rate that brings step k to the goal k/N·target (module docstring), accepted
    within a factor ``band`` of it."""

    def __init__(
        self,
        target: float | None,
        steps: int,
        band: float = TARGET_BAND,
        gradient_zero: bool = False,
    ) -> None:
        self.target = target
        self.steps = steps
        self.band = band
        # the stale loss's gradient is zero (every advantage 0 under a loss that scales with A):
        # its steps move nothing at any learning rate, and a KL of 0 is not searched
        self.gradient_zero = gradient_zero
        self.points: list[tuple[float, float]] = []  # (log lr, log KL) of this step's probes
        self.anchor: Tensor | None = None  # [M] log r_t at θ_{k−1} over the loss tokens
        self.unmoved = 0  # this step's probes whose KL was exactly 0

    def start_step(self, anchor: Tensor | None = None) -> None:
        """A new step from θ_{k−1}, whose log-ratios over the loss tokens are ``anchor``."""
        self.points = []
        self.anchor = anchor
        self.unmoved = 0

    @property
    def tries(self) -> int:
        """This step's redos so far."""
        return len(self.points) + self.unmoved

    def propose(self, k: int, log_ratio: Tensor, lr: float) -> float | None:
        """The learning rate to redo step k with, or None to accept it: ``log_ratio`` [M] is
        log r_t = ℓ_t(θ_k) − ℓ_t(θ_old) over the loss tokens, in float64. A KL of exactly 0
        from a gradient that is not zero is an update below the weights' resolution (θ + lr·u
        rounds to θ): the step is redone with the largest scale, `SCALE_LIMITS`."""
        kl = float(k3(log_ratio).mean()) if log_ratio.numel() else 0.0
        if self.target is None or k == 0 or not math.isfinite(kl):
            return None
        if kl <= 0.0:
            if self.gradient_zero or self.tries >= MAX_PROBES:
                return None
            self.unmoved += 1
            return lr * SCALE_LIMITS[1]
        goal = self.target * k / self.steps
        if abs(math.log(kl / goal)) <= math.log(self.band) or self.tries >= MAX_PROBES:
            return None
        self.points.append((math.log(lr), math.log(kl)))
        scale = None
        if self.anchor is not None:
            scale = line_scale(self.anchor, log_ratio - self.anchor, goal)
        if scale is None:
            slope = 2.0
            if len(self.points) >= 2:
                (x0, y0), (x1, y1) = self.points[-2:]
                if x1 != x0:
                    slope = min(max((y1 - y0) / (x1 - x0), SLOPE_LIMITS[0]), SLOPE_LIMITS[1])
            scale = math.exp(math.log(goal / kl) / slope)
        return lr * min(max(scale, SCALE_LIMITS[0]), SCALE_LIMITS[1])

    def next_lr(self, k: int, here: Tensor, before: Tensor, lr: float) -> float:
        """The first learning rate of step k + 1 from θ_k (log-ratios ``here``), reached from
        θ_{k−1} (``before``) by a step of ``lr``: the next step is taken to change each token's
        log-ratio as much per unit of learning rate as the last one did, and its lr to bring
        the KL to the goal (k + 1)/N·target on that line; ``lr`` when there is no target or the
        line does not reach it."""
        if self.target is None or here.numel() == 0:
            return lr
        goal = self.target * (k + 1) / self.steps
        scale = line_scale(here, here - before, goal)
        return lr if scale is None else lr * scale


def stale_grad_dtype(
    name: str, model_dtype: torch.dtype, device: torch.device
) -> torch.dtype | None:
    """The dtype the stale steps' backward recomputes the blocks in (``source.stale.grad_dtype``,
    `gradlens.sources.autocast_recompute`), or None for the model's own: ``bfloat16`` lowers a
    float32 model's products, ``auto`` does where the device computes bf16 natively
    (`native_bf16`); a model already in a 16-bit dtype has nothing to lower (and the config
    refuses ``bfloat16`` for a float64 run)."""
    if name == "model" or model_dtype != torch.float32:
        return None
    if name == "bfloat16" or native_bf16(device):
        return torch.bfloat16
    return None


def k3(log_ratio: Tensor) -> Tensor:
    """r − 1 − log r of each log-ratio (≥ 0, ≈ (log r)²/2 when small)."""
    return log_ratio.exp() - 1 - log_ratio


def line_scale(anchor: Tensor, step: Tensor, goal: float) -> float | None:
    """The s with mean k3(a + s·b) = goal (a = ``anchor``, b = ``step``; module docstring),
    searched within `SCALE_LIMITS`: the nearer limit when the goal lies beyond them, None when
    the line cannot reach it (k3(a) already at the goal, or a step that changed nothing)."""

    def kl(s: float) -> float:
        return float(k3(anchor + s * step).mean())

    if kl(0.0) >= goal or not bool(step.ne(0).any()):
        return None
    if kl(SCALE_LIMITS[1]) < goal:
        return SCALE_LIMITS[1]
    if kl(SCALE_LIMITS[0]) > goal:
        return SCALE_LIMITS[0]
    lo, hi = math.log(SCALE_LIMITS[0]), math.log(SCALE_LIMITS[1])
    for _ in range(LINE_ITERATIONS):  # the KL grows with s > 0: bisection in log s
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if kl(math.exp(mid)) < goal else (lo, mid)
    return math.exp((lo + hi) / 2)


def subset_rows(n: int, groups: Tensor | None) -> list[int] | None:
    """The sequences the first step's learning-rate search measures first: from every prompt
    group (``groups`` [N], each sequence's; None: one group of all N), its first
    ⌈size/`SUBSET_SHARE`⌉ members, so that every prompt is represented (prompts differ in how
    far a step moves them far more than completions of one prompt do); with groups of one,
    every `SUBSET_SHARE`-th sequence; None when that is more than half the batch (its
    forwards would save too little)."""
    keys = [0] * n if groups is None else [int(g) for g in groups.tolist()]
    members: dict[int, list[int]] = {}
    for row, key in enumerate(keys):
        members.setdefault(key, []).append(row)
    rows = sorted(r for group in members.values() for r in group[: -(-len(group) // SUBSET_SHARE)])
    if len(rows) >= n:  # every group a single sequence: a spread of a quarter of them
        rows = list(range(0, n, SUBSET_SHARE))
    return None if 2 * len(rows) > n else rows


@torch.no_grad()
def _search_on_subset(
    model: nn.Module,
    seqs: Sequences,
    rows: list[int],
    old_logp: Tensor,
    target: float,
    steps: int,
    optimizer: StaleOptimizer,
    temperature: float,
    bias: bool,
    head: TiedHead,
    gradient_zero: bool = False,
) -> int:
    """The first step's learning rate searched on the sequences ``rows`` alone, by forwards
    without autograd, before the whole batch's forward (module docstring); returns the redos
    taken. Its log-ratios start at 0 (θ_0 = θ_old)."""
    mask = seqs.loss_mask[rows]
    search = LearningRateSearch(target, steps, SUBSET_BAND, gradient_zero)
    search.start_step(torch.zeros(int(mask.sum()), dtype=torch.float64, device=mask.device))
    redos = 0
    while redos < MAX_PROBES:
        logp = _forward(model, seqs, rows, temperature, bias, head).logp
        log_ratio = (logp - old_logp[rows])[mask].double()
        check_finite(log_ratio, 1, optimizer.lr)
        lr = search.propose(1, log_ratio, optimizer.lr)
        if lr is None:
            break
        optimizer.rescale(lr)
        redos += 1
    return redos


def _forward(
    model: nn.Module,
    seqs: Sequences,
    rows: list[int],
    temperature: float,
    bias: bool,
    head: TiedHead,
    logits_of: Callable[[Tensor, Tensor], Tensor] = compute_logits,
) -> PolicyPass:
    """The logit path of the sequences ``rows`` (with autograd when it is enabled), the
    lm_head's weight read by ``head``, the logits by ``logits_of`` (`policy_pass`)."""
    part = seqs.select(rows)
    hidden = final_hidden(model, part, temperature, bias)
    weight = head.weight()
    return policy_pass(
        hidden, weight, part.tokens, part.loss_mask, keep_logits=False, logits_of=logits_of
    )


@dataclass(frozen=True)
class _Point:
    logp: Tensor  # [N, T] ℓ at θ_k
    entropy: Tensor | None  # [N, T] H(π_t) at θ_k, when the loss needs it
    hidden: Tensor | None  # [N, T, H] h/T at θ_k, when asked for
    graph: PolicyPass | None  # the forward with autograd over the whole batch (one micro-batch)
    kept_mass: Tensor | None = None  # [N, T] log S_t of the kept sets at θ_k, when asked for
    tape: BlockTape | None = None  # the forward's blocks, when asked to record them


def _with_graph(graph: PolicyPass) -> _Point:
    return _Point(graph.logp.detach(), None, None, graph)


@torch.no_grad()
def _measure(
    model: nn.Module,
    seqs: Sequences,
    plan: MicroBatchPlan,
    temperature: float,
    bias: bool,
    entropy: bool,
    keep_hidden: bool,
    kept_ids: Tensor | None = None,
    record: bool = False,
) -> _Point:
    """ℓ (and H, h, the kept sets' mass log S_t with ``kept_ids``) at the current θ without
    autograd, one micro-batch at a time; with ``record`` and a single micro-batch, the
    transformer blocks' inputs recorded too (`gradlens.sources.blockwise.taped_blocks`, for
    the whole-model gradients at this θ to replay), where the model can be cut at them."""
    logp, ent, hidden, mass = [], [], [], []
    tape = None
    for rows in plan.groups:
        part = seqs.select(rows)
        h = None
        if record and plan.single:
            try:
                with taped_blocks(model) as tape:
                    h = final_hidden(model, part, temperature, bias)
            except BlockwiseUnsupported:
                tape = None
        if h is None:
            h = final_hidden(model, part, temperature, bias)
        p = policy_pass(h, head_weight(model), part.tokens, part.loss_mask, keep_logits=False)
        logp.append(p.logp)
        if entropy:
            ent.append(p.entropy())
        if keep_hidden:
            hidden.append(h)
        if kept_ids is not None:
            mass.append(kept_log_mass(p, kept_ids[rows]))
    return _Point(
        torch.cat(logp),
        torch.cat(ent) if entropy else None,
        torch.cat(hidden) if keep_hidden else None,
        None,
        torch.cat(mass) if kept_ids is not None else None,
        tape,
    )


def stale_steps(
    model: nn.Module,
    seqs: Sequences,
    advantages: Tensor,
    rollout_logp: Tensor,
    cfg: StaleConfig,
    temperature: float,
    spec: LossSpec,
    params: LossParams,
    aggregation: Aggregation,
    bias: bool,
    budget_bytes: int,
    kept_ids: Tensor | None = None,
    groups: Tensor | None = None,
) -> StaleResult:
    """Take the N steps in place on ``model``: the trajectory, π_old, and h at θ_N; with the
    rollout's kept sets ``kept_ids`` [N, T, K] also π_old's kept mass log S^old_t.

    ``groups`` [N]: the sequences' prompt groups (`Batch.groups`, for group-coupled losses)."""
    mask = seqs.loss_mask
    trainable = [p for p in model.parameters() if p.requires_grad]
    if cfg.steps:
        own_memory(trainable)
    optimizer = StaleOptimizer(trainable, cfg.optimizer, cfg.lr, cfg.steps)
    weight = head_weight(model)
    vocab = int(weight.shape[0])
    lowered = stale_grad_dtype(cfg.grad_dtype, weight.dtype, weight.device) if cfg.steps else None
    probed = probe(model, seqs, temperature, bias) if cfg.steps else None
    per_sequence = 0 if probed is None else checkpointed_bytes(probed, model, seqs)
    plan = plan_micro_batches(loss_tokens(mask), per_sequence, vocab, budget_bytes)
    fused = plan.single  # update each parameter inside the backward
    needs_entropy = reads_entropy([spec], params)
    gradient_zero = spec.uses_advantage and not bool(advantages[mask].ne(0).any())
    search = LearningRateSearch(cfg.target_kl, cfg.steps, gradient_zero=gradient_zero)
    every = list(range(int(mask.shape[0])))
    subset = subset_rows(len(every), groups) if cfg.target_kl is not None else None

    def ratio(logp: Tensor) -> Tensor:  # [M] log r_t over the loss tokens, as kl_k3 takes it
        assert old_logp is not None
        return (logp - old_logp)[mask].double()

    trajectory: list[StalePoint] = []
    old_logp: Tensor | None = None
    old_mass: Tensor | None = None
    forwards = backwards = 0
    with checkpointed_blocks(model, lowered) as checkpointed, tied_gradient_in_place(model) as head:
        # the lm_head's backward products in the blocks' lowered dtype too
        product = lowered_logits(lowered if checkpointed else None)
        for k in range(cfg.steps + 1):
            last = k == cfg.steps
            if not last:  # done: after the last forward, below
                report("stale steps", k, cfg.steps)
            search.start_step(None if k == 0 else ratio(trajectory[-1].logp))
            probes = on_subset = 0
            if k == 1 and subset is not None and old_logp is not None:
                assert cfg.target_kl is not None  # a subset is chosen only with a target
                on_subset = _search_on_subset(
                    model, seqs, subset, old_logp, cfg.target_kl, cfg.steps, optimizer,
                    temperature, bias, head, gradient_zero,
                )  # fmt: skip
                probes = on_subset
            while True:
                if fused and not last:
                    with torch.enable_grad():
                        point = _with_graph(
                            _forward(model, seqs, every, temperature, bias, head, product)
                        )
                    forwards += 1  # a redo's forward has autograd too, and counts
                else:
                    point = _measure(
                        model, seqs, plan, temperature, bias, needs_entropy and not last, last,
                        kept_ids if old_logp is None else None, record=last,
                    )  # fmt: skip
                if old_logp is None:
                    old_logp = point.logp  # π_old: the training pass at θ_old
                    if kept_ids is not None and point.graph is not None:
                        old_mass = kept_log_mass(point.graph, kept_ids)
                    elif kept_ids is not None:
                        old_mass = point.kept_mass
                log_ratio = ratio(point.logp)
                check_finite(log_ratio, k, optimizer.lr)
                lr = search.propose(k, log_ratio, optimizer.lr)
                if lr is None:
                    break
                point = _Point(point.logp, None, None, None)  # drop the graph before redoing
                optimizer.rescale(lr)
                probes += 1
            loss_value = None
            accepted = optimizer.lr
            if not last:
                if k > 0:  # the next step's first guess, from how far this one went
                    optimizer.lr = search.next_lr(
                        k, ratio(point.logp), ratio(trajectory[-1].logp), accepted
                    )
                loss_value = _step(
                    model, seqs, plan, point, old_logp, advantages, rollout_logp, optimizer,
                    spec, params, aggregation, temperature, bias, groups, head, product,
                )  # fmt: skip
                point = _Point(point.logp, None, None, None)  # free the graph's tensors
                if not fused:  # fused: the forward was counted above
                    forwards += len(plan.groups)
                backwards += 1 if fused else len(plan.groups)
            trajectory.append(
                StalePoint(
                    k,
                    loss_value,
                    point.logp,
                    lr=None if k == 0 else accepted,
                    probes=probes,
                    subset_probes=on_subset,
                )
            )
    report("stale steps", cfg.steps, cfg.steps)
    assert old_logp is not None and point.hidden is not None
    model_pass = ModelPass(
        name="stale steps",
        micro_batches=len(plan.groups),
        forwards=forwards,
        backwards=backwards,
        checkpointed=checkpointed,
        recompute_dtype=DTYPE_NAMES_OF[lowered] if checkpointed and lowered else None,
        budget_bytes=plan.budget_bytes,
        bytes_per_sequence=plan.bytes_per_sequence,
        over_budget=plan.over_budget,
        **pass_positions(seqs, plan.groups),
    )
    record = StalenessRecord(
        cfg.steps,
        cfg.optimizer,
        cfg.lr,
        cfg.loss,
        trajectory,
        target_kl=cfg.target_kl,
        model_pass=model_pass if cfg.steps else None,
    )
    return StaleResult(
        record, old_logp, point.hidden, old_mass, tape=point.tape, sequence_bytes=probed
    )


def check_finite(log_ratio: Tensor, k: int, lr: float) -> None:
    """Refuse a step that made the log-probs non-finite (a learning rate far too large: the
    logits overflow). A redo cannot repair it exactly — θ_{k−1} = θ_k − lr·u loses θ_{k−1}'s
    bits once lr·u dwarfs them — so the run stops and names the setting."""
    if k > 0 and not bool(torch.isfinite(log_ratio).all()):
        raise GradlensError(
            f"source.stale.lr: stale step {k} at learning rate {lr:g} made the log-probs "
            "non-finite (the logits overflowed); lower source.stale.lr (with target_kl, the "
            "learning-rate search starts from it and cannot undo a step that large exactly)"
        )


@torch.no_grad()
def own_memory(params: list[nn.Parameter]) -> None:
    """Each CPU parameter in memory of its own before the steps write to it. A checkpoint
    loaded from safetensors maps its file, and the first write to each mapped page copies it
    (a page fault per 4 KiB): the first step's update of a 135M-parameter float32 model took
    3.3 s that way against 0.4 s for copying every weight first and 1.6 s for the update."""
    for p in params:
        if p.device.type == "cpu":
            p.data = p.data.clone()


def _step(
    model: nn.Module,
    seqs: Sequences,
    plan: MicroBatchPlan,
    point: _Point,
    old_logp: Tensor,
    advantages: Tensor,
    rollout_logp: Tensor,
    optimizer: StaleOptimizer,
    spec: LossSpec,
    params: LossParams,
    aggregation: Aggregation,
    temperature: float,
    bias: bool,
    groups: Tensor | None,
    head: TiedHead,
    logits_of: Callable[[Tensor, Tensor], Tensor],
) -> float:
    """One optimizer step from θ_k (``point``); the stale loss at θ_k."""
    mask = seqs.loss_mask
    # The loss reads only the token inputs of the batch; the hidden states and the weight are
    # not needed (empty).
    batch = Batch(
        hidden=torch.empty(0),
        weight=torch.empty(0),
        tokens=seqs.tokens,
        mask=mask,
        old_logp=old_logp,
        advantages=advantages,
        rollout_logp=rollout_logp.to(old_logp.dtype),
        groups=groups,
    )
    needs_entropy = reads_entropy([spec], params)
    release_free_memory()  # the pages freed since the last step, before its gradients
    if point.graph is not None:  # one micro-batch: update inside the backward
        entropy = policy_entropy(point.graph, [spec], params)
        loss = objective(batch, point.graph.logp, spec, params, aggregation, entropy).loss
        with optimizer.in_backward():
            loss.backward()
        return float(loss.detach())
    value = 0.0
    for rows in plan.groups:
        with torch.enable_grad():
            part = _forward(model, seqs, rows, temperature, bias, head, logits_of)
            logp = grid_with(point.logp, rows, part.logp)
            entropy = None
            if needs_entropy:
                assert point.entropy is not None
                part_entropy = policy_entropy(part, [spec], params)
                assert part_entropy is not None
                entropy = grid_with(point.entropy, rows, part_entropy)
            loss = objective(batch, logp, spec, params, aggregation, entropy).loss
            loss.backward()
        value = float(loss.detach())
    optimizer.step()
    return value


def kept_log_mass(policy: PolicyPass, kept_ids: Tensor) -> Tensor:
    """[N, T] log S_t = log Σ_{v∈K_t} π_t,v of the pass's (full) distribution, 0 off the mask."""
    with torch.no_grad():
        keep = kept_entries(kept_ids[policy.rows, policy.cols], 0, policy.log_probs.shape[-1])
        mass = torch.logsumexp(policy.log_probs.detach().masked_fill(~keep, -torch.inf), dim=-1)
    return on_grid(mass, policy.rows, policy.cols, policy.logp.shape)
