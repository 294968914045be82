"""The Python API: diagnose the tensors of a training step, as ``gradlens compare`` would.

::

    import gradlens
    report = gradlens.diagnose(
        hidden=h,            # [N, T, H] final hidden states (after the final norm)
        weight=W,            # [V, H] lm_head weight (bias=: optional [V])
        tokens=y,            # [N, T] sampled token ids
        mask=m,              # [N, T] bool: the tokens that enter the loss
        advantages=A,        # [N] or [N, T]
        old_logp=None, rollout_logp=None, ref_logp=None,   # [N, T] each, optional
        groups=None,         # [N] prompt-group ids, optional (group-coupled losses: real)
        losses=("reinforce", "ppo", "ppo_clip", "sft"),
        loss={"eps_high": 0.28, "aggregation": "token_mean"},  # the YAML `loss` section
        diagnostics=None,    # the YAML `diagnostics` section (engine, top_k, ...)
        tokenizer=None,      # anything with decode(list[int]) -> str: the attribution's
    )                        # largest tokens and sequences decoded, with context
    report.model_dump(mode="json")   # the document `gradlens compare --format json` prints
    report.metrics()                 # flat {name: float}

The tensors stay where they are (any device, any float dtype the engines accept); nothing is
copied to the CPU and no [T, V] tensor is kept beyond the engine's memory budget (the streamed
engine decides, as in ``compare``). The caller's tensors are only read: gradlens works on
detached views, never touches ``requires_grad`` or ``.grad``, and runs under ``torch.no_grad``
except for the autograd reference, which is off by default here (``diagnostics={"reference":
"autograd"}`` turns it on) and on in ``compare``. Without ``old_logp`` the batch is on-policy:
π_old := π_θ exactly (every ratio 1).

Bad input raises `gradlens.GradlensError` naming the argument; the values are checked by the
rule every source's batch meets (`gradlens.validation`: token ids in the vocabulary, finite
advantages, log-probs and hidden states at the positions in the loss, log-probs ≤ 0, a finite
lm_head), each problem named with its argument and first index, ``advantages[1, 3]``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from gradlens.compare.run import compare_batch
from gradlens.config import Config, validate
from gradlens.containers import Batch, Origin, plain_name
from gradlens.errors import GradlensError
from gradlens.grads import softmax_view
from gradlens.results import CompareReport
from gradlens.validation import check_batch

DTYPE_NAMES = {torch.float64: "float64", torch.float32: "float32", torch.bfloat16: "bfloat16"}
API_SOURCE = {"kind": "tensors", "description": "gradlens.diagnose(...)"}


def _tensor(name: str, value: Any) -> Tensor:
    if not isinstance(value, Tensor):
        raise GradlensError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    return value.detach()


def _shape(name: str, value: Tensor, shape: tuple[int, ...]) -> None:
    if tuple(value.shape) != shape:
        raise GradlensError(f"{name}: expected shape {list(shape)}, got {list(value.shape)}")


def _per_token(name: str, value: Any, shape: tuple[int, int], dtype: torch.dtype) -> Tensor | None:
    """An optional [N, T] float tensor (log-probs), as the batch stores it."""
    if value is None:
        return None
    t = _tensor(name, value)
    _shape(name, t, shape)
    if not t.is_floating_point():
        raise GradlensError(f"{name}: expected a floating-point tensor, got {t.dtype}")
    return t.to(dtype)


def build_batch(
    hidden: Any,
    weight: Any,
    tokens: Any,
    mask: Any,
    advantages: Any,
    old_logp: Any = None,
    rollout_logp: Any = None,
    ref_logp: Any = None,
    bias: Any = None,
    groups: Any = None,
) -> Batch:
    """The `Batch` of the arguments of `diagnose`, checked; errors name the argument."""
    h, w = _tensor("hidden", hidden), _tensor("weight", weight)
    if h.dim() != 3:
        raise GradlensError(f"hidden: expected [N, T, H], got shape {list(h.shape)}")
    if w.dim() != 2:
        raise GradlensError(f"weight: expected [V, H], got shape {list(w.shape)}")
    n, t, size = h.shape
    if w.shape[1] != size:
        raise GradlensError(
            f"weight: its hidden size {w.shape[1]} differs from hidden's {size} "
            f"(weight [V, H] = {list(w.shape)}, hidden [N, T, H] = {list(h.shape)})"
        )
    if w.dtype not in DTYPE_NAMES:
        raise GradlensError(
            f"weight: dtype {w.dtype} is not supported; use one of "
            + ", ".join(str(d).removeprefix("torch.") for d in DTYPE_NAMES)
        )
    if h.device != w.device:
        raise GradlensError(f"hidden is on {h.device} and weight on {w.device}: use one device")
    if bias is not None:  # z = W h + b = [W | b]·[h; 1]
        b = _tensor("bias", bias)
        _shape("bias", b, (w.shape[0],))
        w = torch.cat([w, b.to(w.dtype)[:, None]], dim=1)
        h = torch.cat([h, torch.ones_like(h[..., :1])], dim=-1)
    y = _tensor("tokens", tokens)
    _shape("tokens", y, (n, t))
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise GradlensError(f"tokens: expected integer token ids, got {y.dtype}")
    m = _tensor("mask", mask)
    _shape("mask", m, (n, t))
    m = m.bool()
    if not bool(m.any()):
        raise GradlensError("mask: no token enters the loss (the mask is all False)")
    acc = torch.float64 if w.dtype == torch.float64 else torch.float32
    a = _tensor("advantages", advantages)
    if tuple(a.shape) == (n,):
        a = a[:, None].expand(n, t)
    _shape("advantages", a, (n, t))
    logps = {
        name: _per_token(name, value, (n, t), acc)
        for name, value in (
            ("old_logp", old_logp),
            ("rollout_logp", rollout_logp),
            ("ref_logp", ref_logp),
        )
    }
    prompt_groups = None
    if groups is not None:
        g = _tensor("groups", groups)
        _shape("groups", g, (n,))
        if g.is_floating_point() or g.is_complex() or g.dtype == torch.bool:
            raise GradlensError(f"groups: expected integer prompt-group ids, got {g.dtype}")
        prompt_groups = g.long().to(w.device)
    batch = Batch(
        hidden=h.to(w.dtype),
        weight=w,
        tokens=y.long(),
        mask=m,
        old_logp=torch.zeros(n, t, dtype=acc, device=w.device)
        if logps["old_logp"] is None
        else logps["old_logp"],
        advantages=(a.to(acc) * m),
        rollout_logp=logps["rollout_logp"],
        ref_logp=logps["ref_logp"],
        groups=prompt_groups,
        source=f"tensors: {n} sequences × ≤{t} tokens, V={w.shape[0]}, H={w.shape[1]}",
        advantage_note="given",
        origin=Origin(argument_name),
    )
    check_batch(batch)  # the rule of every source: token ids, finite values, log-probs ≤ 0
    if logps["old_logp"] is not None:
        return batch
    # on-policy: π_old is π_θ bit for bit
    return dataclasses.replace(batch, old_logp=softmax_view(batch).logp.clone())


def argument_name(field: str, index: tuple[int, ...]) -> str:
    """Each tensor by the argument of `diagnose` that gave it (`Origin.name`)."""
    return plain_name(field, index).removeprefix("batch.")


def api_config(
    losses: Iterable[str],
    loss: Mapping[str, Any] | None,
    diagnostics: Mapping[str, Any] | None,
    dtype: torch.dtype,
    device: torch.device,
) -> Config:
    """The run's settings, validated like a config file's (errors name ``loss.x``, ...)."""
    settings = {"reference": "none", **(diagnostics or {})}
    return validate(
        {
            "dtype": DTYPE_NAMES[dtype],
            "device": "cuda" if device.type == "cuda" else "cpu",
            "losses": list(losses),
            "loss": dict(loss or {}),
            "diagnostics": settings,
        },
        origin="gradlens.diagnose",
    )


def diagnose(
    hidden: Any,
    weight: Any,
    tokens: Any,
    mask: Any,
    advantages: Any,
    old_logp: Any = None,
    rollout_logp: Any = None,
    ref_logp: Any = None,
    *,
    losses: Iterable[str] = ("reinforce", "ppo", "ppo_clip", "sft"),
    loss: Mapping[str, Any] | None = None,
    diagnostics: Mapping[str, Any] | None = None,
    bias: Any = None,
    tokenizer: Any = None,
    groups: Any = None,
) -> CompareReport:
    """Diagnose one batch of a training run (see the module docstring)."""
    if tokenizer is not None and not callable(getattr(tokenizer, "decode", None)):
        raise GradlensError(
            f"tokenizer: expected an object with a decode(list[int]) -> str method (a "
            f"transformers or tokenizers tokenizer), got {type(tokenizer).__name__}"
        )
    batch = build_batch(
        hidden, weight, tokens, mask, advantages, old_logp, rollout_logp, ref_logp, bias, groups
    )
    batch = dataclasses.replace(batch, tokenizer=tokenizer)
    config = api_config(losses, loss, diagnostics, batch.weight.dtype, batch.weight.device)
    with torch.no_grad():
        report = compare_batch(batch, config, batch.weight.device)
    described = {**report.config, "source": API_SOURCE}
    return report.model_copy(update={"config": described})
