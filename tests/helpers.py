"""Small builders shared by the maths tests: batches from tensors, configs, error measures."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import textwrap
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import Result
from torch import Tensor
from typer.testing import CliRunner

from gradlens.cli import app
from gradlens.compare.run import source_context
from gradlens.config import Config, validate
from gradlens.containers import Batch, KeptSets, Teacher
from gradlens.grads import LossGradients, autograd_reference, closed_form, softmax_view
from gradlens.losses import Aggregation, LossParams, get_loss
from gradlens.sources import build_source

F64 = torch.float64

# The distribution of losses.md §12: π = [0.5, 0.2, 0.15, 0.1, 0.05].
PI = [0.5, 0.2, 0.15, 0.1, 0.05]


def make_batch(
    hidden: Tensor,
    weight: Tensor,
    tokens: Tensor,
    mask: Tensor,
    old_logp: Tensor | None = None,
    advantages: Tensor | None = None,
    rollout_logp: Tensor | None = None,
) -> Batch:
    """A `Batch` straight from tensors; old_logp defaults to on-policy (ℓ_old = ℓ exactly)."""
    acc = F64 if weight.dtype == F64 else torch.float32
    n, t = mask.shape
    batch = Batch(
        hidden=hidden,
        weight=weight,
        tokens=tokens.long(),
        mask=mask.bool(),
        old_logp=torch.zeros(n, t, dtype=acc) if old_logp is None else old_logp.to(acc),
        advantages=torch.ones(n, t, dtype=acc) if advantages is None else advantages.to(acc),
        rollout_logp=rollout_logp,
        source="tests",
    )
    return on_policy(batch) if old_logp is None else batch


def on_policy(batch: Batch) -> Batch:
    """The same batch with ℓ_old set bit-for-bit to gradlens's own ℓ, so that r = 1 exactly."""
    return dataclasses.replace(batch, old_logp=softmax_view(batch).logp.clone())


def random_batch(
    seed: int,
    n: int = 6,
    t: int = 5,
    v: int = 11,
    h: int = 7,
    dtype: torch.dtype = F64,
    logit_scale: float = 1.5,
    drift: float = 0.8,
) -> Batch:
    """A seeded batch with ragged masks, per-sequence advantages of both signs (and an exact
    zero), log-ratio noise log r ~ N(0, drift²) on every valid token, and prompt groups of two
    consecutive sequences."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, t + 1, (n,), generator=gen)  # [N]
    mask = torch.arange(t)[None, :] < lengths[:, None]  # [N, T]
    hidden = torch.randn(n, t, h, generator=gen, dtype=F64)  # [N, T, H]
    weight = logit_scale * torch.randn(v, h, generator=gen, dtype=F64) / math.sqrt(h)  # [V, H]
    tokens = torch.randint(0, v, (n, t), generator=gen)  # [N, T]
    adv_seq = torch.randn(n, generator=gen, dtype=F64)  # [N]
    adv_seq[0] = 0.0  # A = 0: zero gradient, never clipped
    advantages = adv_seq[:, None].expand(n, t).clone()  # [N, T]
    log_r = drift * torch.randn(n, t, generator=gen, dtype=F64)  # [N, T]
    batch = make_batch(hidden.to(dtype), weight.to(dtype), tokens, mask, advantages=advantages)
    groups = torch.arange(n) // 2  # prompt groups of two consecutive sequences (for real)
    return dataclasses.replace(
        batch, old_logp=batch.old_logp - log_r.to(batch.old_logp.dtype), groups=groups
    )


def gradients(
    batch: Batch,
    loss: str,
    params: LossParams | None = None,
    mode: str = "token_mean",
    loss_scale_factor: float | None = None,
) -> LossGradients:
    """Closed-form gradients of one loss."""
    agg = Aggregation(mode, loss_scale_factor)
    return closed_form(batch, softmax_view(batch), get_loss(loss), params or LossParams(), agg)


def rel_err(actual: Tensor, expected: Tensor) -> float:
    """Normwise max|a − b| / max|b| in float64 (0 when both are exactly 0)."""
    a, b = actual.double(), expected.double()
    diff, scale = float((a - b).abs().max()), float(b.abs().max())
    return diff if scale == 0.0 else diff / scale


def literal_config(
    sequences: list[list[dict[str, Any]]], losses: list[str], dtype: str = "float64", **loss: Any
) -> Config:
    """A validated literal-source config: ``sequences`` is a list of lists of positions."""
    return validate(
        {
            "dtype": dtype,
            "losses": losses,
            "loss": loss,
            "diagnostics": {"token_details": "on"},
            "source": {"kind": "literal", "sequences": [{"positions": s} for s in sequences]},
        }
    )


def build_batch(
    config: Config, device: torch.device | None = None, dtype: torch.dtype | None = None
) -> Batch:
    """The batch of ``config``'s source (in ``dtype``, default the config's)."""
    ctx = source_context(config, device or torch.device("cpu"))
    if dtype is not None:
        ctx = dataclasses.replace(ctx, dtype=dtype)
    return build_source(config.source, ctx)


# PPO-clip three ways: right (token mean), summed over tokens (the normaliser of Liger 1082) and
# without the importance weight r (the other half of Liger 1082: gradient −A·M instead of −A·r·M).
IMPLEMENTATIONS = textwrap.dedent(
    """
    import torch

    def _surrogate(logp, old_logp, advantages):
        r = torch.exp(logp - old_logp)
        return torch.maximum(-advantages * r, -advantages * torch.clamp(r, 0.8, 1.28))

    def token_mean(logp, old_logp, advantages, mask):
        return (_surrogate(logp, old_logp, advantages) * mask).sum() / mask.sum()

    def token_sum(logp, old_logp, advantages, mask):
        return (_surrogate(logp, old_logp, advantages) * mask).sum()

    def no_is_weight(logp, old_logp, advantages, mask):
        r = torch.exp(logp - old_logp).detach()
        off = ((advantages > 0) & (r > 1.28)) | ((advantages < 0) & (r < 0.8))
        per_token = torch.where(off, 0.0, -advantages * logp)
        return (per_token * mask).sum() / mask.sum()
    """
)


def random_kept(batch: Batch, seed: int, keep_share: float = 0.5) -> KeptSets:
    """Random kept sets that always hold the sampled token, with random kept masses of π_old,
    μ and π_ref (log S ∈ [−1, 0])."""
    gen = torch.Generator().manual_seed(seed)
    n, t = batch.mask.shape
    v = batch.vocab_size
    keep = torch.rand(n, t, v, generator=gen) < keep_share  # [N, T, V]
    keep.scatter_(-1, batch.tokens[..., None], True)  # y_t ∈ K_t
    width = int(keep.sum(-1).max())
    order = torch.argsort((~keep).to(torch.int8), dim=-1, stable=True)  # kept ids first
    count = keep.sum(-1)  # [N, T]
    ids = torch.where(torch.arange(width) < count[..., None], order[..., :width], -1)
    masses = [-torch.rand(n, t, generator=gen, dtype=F64) for _ in range(3)]
    return KeptSets(ids, "random", *masses)


def three_policy_batch(seed: int, drift: float = 0.8, rollout: float = 0.3) -> Batch:
    """random_batch plus μ_old (log-noise `rollout` around π_old) and π_ref."""
    batch = random_batch(seed, n=8, t=6, v=13, h=7, drift=drift)
    gen = torch.Generator().manual_seed(seed + 100)
    n, t = batch.mask.shape
    rollout_logp = batch.old_logp - rollout * torch.randn(n, t, generator=gen, dtype=F64)
    ref_logp = batch.old_logp - 0.5 * torch.randn(n, t, generator=gen, dtype=F64)
    return dataclasses.replace(batch, rollout_logp=rollout_logp, ref_logp=ref_logp)


# ----------------------------------------------------------------------------- reports

RTOL = 1e-5
NUMBER = re.compile(r"-?\d+(\.\d+)?(e[-+]?\d+)?")
SKIPPED = {"environment", "schema_version"}
# Rounding residuals: their size, not their digits, is the point; the verdicts are compared.
RESIDUALS = {
    "logits_max_abs",
    "logits_max_rel",
    "weight_rel",
    "post_max_rel_err",
    "coefficient_max_abs_diff",
    "coefficient_rel",
    "grad_logits_rel",
    "row_max_rel",
    "worst",  # a sweep check's point of the largest residual: where rounding peaks
}
AGREEMENT_ERRORS = {"coefficient", "grad_logits", "grad_weight"}


def differences(
    old: Any, new: Any, path: str = "", scales: Mapping[str, float] | None = None
) -> list[str]:
    """Every field where ``new`` differs from ``old``, as 'path: old != new'.

    ``scales``: path → the size of the terms a number is a sum of, where that is far above the
    number itself (a sum that cancels): the number is compared to ``RTOL`` of it as well."""
    scales = scales or {}
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new)):
            if key in SKIPPED:
                continue
            where = f"{path}.{key}"
            if key not in old or key not in new:
                out.append(f"{where}: only in {'new' if key in new else 'golden'}")
                continue
            if key in RESIDUALS or (path.endswith(".agreement") and key in AGREEMENT_ERRORS):
                if (old[key] is None) != (new[key] is None):
                    out.append(f"{where}: {old[key]!r} != {new[key]!r}")
                continue
            if key == "detail" and path.startswith(".checks"):  # residuals written into words
                old_words, new_words = NUMBER.sub("#", old[key]), NUMBER.sub("#", new[key])
                if old_words != new_words:
                    out.append(f"{where}: {old[key]!r} != {new[key]!r}")
                continue
            out += differences(old[key], new[key], where, scales)
        return out
    if isinstance(old, list) and isinstance(new, list):
        if len(old) != len(new):
            return [f"{path}: {len(old)} items != {len(new)}"]
        if _float_vector(old) and _float_vector(new):
            return _vector_differences(old, new, path)
        scales = {**scales, **_share_scales(old, path)}
        out = []
        for i, (a, b) in enumerate(zip(old, new, strict=True)):
            out += differences(a, b, f"{path}[{i}]", scales)
        return out
    if isinstance(old, float) or isinstance(new, float):
        numbers = isinstance(old, (int, float)) and isinstance(new, (int, float))
        if numbers and _close(old, new, scales.get(path, 0.0)):
            return []
        return [f"{path}: {old!r} != {new!r}"]
    return [] if old == new else [f"{path}: {old!r} != {new!r}"]


def _close(old: float, new: float, scale: float) -> bool:
    """Equal to ``RTOL`` of ``old``, or of ``scale`` (the size of the terms it is a sum of)."""
    return math.isclose(old, new, rel_tol=RTOL, abs_tol=max(1e-12, RTOL * scale))


def _share_scales(records: list[Any], path: str) -> dict[str, float]:
    """The ``share`` of each record of a ranked list (the attribution's top sequences and
    tokens: each one's part of the batch's lm_head update), with the list's largest share as its
    scale: the shares are one quantity computed the same way for every record, as in a vector of
    numbers (`_vector_differences`), and a share far below the largest is as uncertain in its
    own digits (top_sequences[7].share = 9.6e-7 beside 0.42 moved by 2.5e-5 of itself between
    two CPUs' float32 kernels, 6e-11 of the largest)."""
    shares = [r.get("share") for r in records if isinstance(r, dict)]
    finite = [abs(x) for x in shares if isinstance(x, float) and math.isfinite(x)]
    if len(shares) != len(records) or not finite:
        return {}
    return {f"{path}[{i}].share": max(finite) for i in range(len(records))}


def _float_vector(items: list[Any]) -> bool:
    return any(isinstance(x, float) for x in items) and all(
        isinstance(x, (int, float)) and not isinstance(x, bool) for x in items
    )


def _vector_differences(old: list[float], new: list[float], path: str) -> list[str]:
    """A list of numbers compared as one vector, each entry to ``RTOL`` of the largest |entry|.

    The entries of such a list are one quantity computed the same way at every index (a share
    of the update per token, a value per bin): each carries the rounding of the sums it came
    from, whose size follows the terms summed, not the entry. An entry much smaller than the
    largest is a difference of larger terms, and its own digits move by more than ``RTOL``
    when a kernel sums in another order (share 1e-7 in a list whose largest is 1e-2: 1e-12 of
    rounding is 1e-5 of it); a wrong formula moves the largest entries too."""
    scale = max((abs(x) for x in old if math.isfinite(x)), default=0.0)
    return [
        f"{path}[{i}]: {a!r} != {b!r} (the list's largest |entry| {scale:.3g})"
        for i, (a, b) in enumerate(zip(old, new, strict=True))
        if not _close(a, b, scale)
    ]


def with_teacher(batch: Batch, seed: int, h: int = 5, k: int = 4, stored: bool = False) -> Batch:
    """``batch`` with a seeded teacher: a hidden/weight pair of hidden size ``h`` (its logits
    about as peaked as the student's), or with ``stored`` only the pair's top-``k`` ids and
    log-probs, as a batch file stores them. log q(y_t) is set in both."""
    gen = torch.Generator().manual_seed(seed + 1000)
    n, t = batch.mask.shape
    v = batch.vocab_size
    dtype = batch.weight.dtype
    hidden = torch.randn(n, t, h, generator=gen, dtype=F64)  # [N, T, H']
    weight = 1.5 * torch.randn(v, h, generator=gen, dtype=F64) / math.sqrt(h)  # [V, H']
    logq = torch.log_softmax(hidden @ weight.T, dim=-1)  # [N, T, V]
    top = torch.topk(logq, k, dim=-1)
    sampled = logq.gather(-1, batch.tokens[..., None]).squeeze(-1)  # [N, T]
    acc = F64 if dtype == F64 else torch.float32
    if stored:
        teacher = Teacher(topk_ids=top.indices, topk_logp=top.values.to(acc))
    else:
        teacher = Teacher(hidden=hidden.to(dtype), weight=weight.to(dtype))
    teacher = dataclasses.replace(teacher, sampled_logp=sampled.to(acc))
    return dataclasses.replace(batch, teacher=teacher)


# ----------------------------------------------------------------------------- literal reports

# e_y − π for the distribution PI at y = 0 and y = 4: ∂L/∂z = c·(e_y − π) for one token.
E0 = [0.5, -0.2, -0.15, -0.1, -0.05]
E4 = [-0.5, -0.2, -0.15, -0.1, 0.95]
# float64 literal cases: the only error is the rounding of z = log π and softmax(z) (~1e-16);
# six-decimal hand values are compared to 1e-6 (``SIX``), exact ones to 1e-12 (``ABS``).
ABS = 1e-12
SIX = 1e-6
# Closed form vs autograd in float64: the same formula in two orders, a few ulps times max|g|
# and the number of summed terms (~1e-14); formula errors are O(1).
TOL_F64 = 1e-12
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def scaled(c: float, direction: list[float] = E0) -> list[float]:
    """c·(e_y − π): one token's logit gradient for coefficient c."""
    return [c * x for x in direction]


def invoke(*args: str) -> Result:
    """The CLI, in-process."""
    return CliRunner().invoke(app, list(args))


def cli_report(config: str, *sets: str) -> dict[str, Any]:
    """``gradlens compare -c configs/<config> -f json --check``: the JSON, every check passed."""
    args = ["compare", "-c", str(CONFIGS / config), "-f", "json", "--check"]
    for s in sets:
        args += ["--set", s]
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["passed"] is True
    return data


def loss_json(report: dict[str, Any], name: str) -> dict[str, Any]:
    """Loss ``name``'s section of a JSON report."""
    return next(r for r in report["losses"] if r["name"] == name)


def coefficients(report: dict[str, Any], name: str) -> list[float]:
    """c_t of every token of loss ``name`` (the report needs token details)."""
    return [t["coefficient"] for t in loss_json(report, name)["tokens"]]


def token_grad(report: dict[str, Any], name: str, k: int) -> list[float]:
    """∂L/∂z of token ``k`` of loss ``name``."""
    return loss_json(report, name)["tokens"][k]["grad_logits"]


def assert_agrees_with_autograd(
    batch: Batch, name: str, params: LossParams, aggregation: Aggregation
) -> None:
    """Closed form vs autograd in float64 (``TOL_F64``), a non-trivial gradient, c_t = 0 at masked
    positions and zero-sum logit gradients (the entropy bonus included)."""
    spec = get_loss(name)
    closed = closed_form(batch, softmax_view(batch), spec, params, aggregation)
    ref = autograd_reference(batch, spec, params, aggregation)
    m = batch.mask
    assert float(closed.grad_weight.abs().max()) > 0
    assert rel_err(closed.coefficient[m], ref.coefficient[m]) <= TOL_F64
    assert rel_err(closed.grad_logits, ref.grad_logits) <= TOL_F64
    assert rel_err(closed.grad_weight, ref.grad_weight) <= TOL_F64
    assert closed.loss == pytest.approx(ref.loss, rel=TOL_F64, abs=TOL_F64)
    assert torch.all(closed.coefficient[~m] == 0)
    scale = float(closed.grad_logits.abs().max())  # Σ_v of V float64 terms: a few V·u of it
    assert float(closed.grad_logits.sum(-1).abs().max()) <= 1e-13 * max(scale, 1.0)


def model_grad_norms(report: Any) -> dict[str, list[float | None]]:
    """Each loss's whole-model gradient norms: the total, the tied tensor's, every group's."""
    out = {}
    for r in report.losses:
        mg = r.model_grads
        assert mg is not None
        out[r.name] = [mg.total_norm, mg.tied_grad_norm, *(g.norm for g in mg.groups)]
    return out
