"""Rollouts: completions sampled token by token, with the log-prob μ of each.

The sampler is the "inference engine": a copy of the model in ``source.rollout_dtype`` with a
key-value cache, all sequences of the batch decoded together. ``auto`` (the default) is
bfloat16 where the device computes it natively and float32 elsewhere: a CPU without bf16
instructions emulates it at more than the cost of float32 (`rollout_dtype`). At each step the
logits of the last position are upcast to float32 (as vLLM does; a float64 model keeps
float64), divided by the temperature
T, and

    μ(y) = softmax(z/T)(y)              the rollout log-prob returned with the token,
    y ~ softmax(z/T) restricted to the kept set K_t and renormalised,

K_t: the ``top_k`` most probable tokens (all for 0), then of those (renormalised, as vLLM
orders the two filters) the smallest prefix with mass ≥ ``top_p``. K_t is a prefix of the
sorted distribution, so it is recorded as that prefix's ids (`KeptSets`), with the rollout
pass's kept mass log S^μ_t = log Σ_{v∈K_t} μ_t,v; without top-p or top-k nothing is recorded.
Each step's tokens are drawn by the inverse of the CDF, one uniform number per sequence from the
run's seeded generator (`gradlens.sources.categorical`).

The prompts' forward that starts the decoding takes each prompt once, not once per completion
of its group, and the cache and the last logits are then repeated row by row (`prefill`; where
the cache cannot repeat its rows, every row goes through). A row's keys, values and logits
depend on that row only, so the rollout is the one of a forward over every row, at
1/``group_size`` of its cost: the same tokens, and μ bit for bit where the products round alike
for 4 and for 12 rows (under the tests' pinned kernels in float32 and bf16; with the machine's
own kernels, the bf16 rollout on both development CPUs). A Xeon's own MKL rounds float32
products of different row counts differently: a float32 rollout's μ there moved by up to 2e-6
(as any change of batch composition in an inference engine does).

The cache is handed back to the model under the name its ``forward`` takes: ``cache`` in the
transformers releases that rename it (there ``past_key_values`` warns, and 5.40 removes it),
``past_key_values`` in the ones before.

A sequence stops at a stop token (which is kept and enters the loss) or after
``max_new_tokens``; the stop tokens are the tokenizer's EOS and the generation config's
``eos_token_id`` (chat models end a turn with a token of their own; `stop_tokens`). Prompts
(gradlens.sources.prompts) are left-padded so that every sequence's completion starts at the
same column; positions count real tokens only, so padding changes nothing.
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from gradlens.containers import LoadedModel, Sequences
from gradlens.progress import report
from gradlens.sources.categorical import draw
from gradlens.sources.forward import position_ids
from gradlens.sources.native_dtype import native_bf16
from gradlens.sources.passes import accumulation_dtype


def rollout_dtype(name: str, device: torch.device) -> tuple[str, str]:
    """(dtype name, why) of ``source.rollout_dtype``: ``auto`` is bfloat16 where the device
    computes it natively and float32 elsewhere (emulated bf16 costs more than float32)."""
    if name != "auto":
        return name, "source.rollout_dtype"
    if native_bf16(device):
        return "bfloat16", f"auto: {device.type} computes bf16 natively"
    return "float32", f"auto: no native bf16 on this {device.type}"


@torch.no_grad()
def rollout_copy(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A copy of ``model`` whose floating-point parameters and buffers are in ``dtype``, each
    converted straight from the original (as ``copy.deepcopy(model).to(dtype)`` makes it, the
    same bits, without the whole model copied first in its own dtype: for a 135M-parameter
    float32 model and bfloat16, 0.27 GB written instead of 0.81 GB)."""
    memo: dict[int, Any] = {}
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) in memo or not t.is_floating_point():
            continue
        converted = t.detach().to(dtype)
        if isinstance(t, nn.Parameter):
            converted = nn.Parameter(converted, requires_grad=t.requires_grad)
        memo[id(t)] = converted
    return copy.deepcopy(model, memo).to(dtype)  # .to: whatever the memo did not reach


def stop_tokens(loaded: LoadedModel) -> list[int]:
    """The token ids that end a completion: the tokenizer's EOS and the generation config's
    ``eos_token_id`` (one id or a list: chat models often stop at an end-of-turn token)."""
    ids: list[int] = []
    eos = loaded.tokenizer.eos_token_id
    if eos is not None:
        ids.append(int(eos))
    config = getattr(loaded.model, "generation_config", None)
    extra = getattr(config, "eos_token_id", None)
    for i in extra if isinstance(extra, (list, tuple)) else [extra]:
        if i is not None and int(i) not in ids and int(i) < loaded.vocab_size:
            ids.append(int(i))
    return ids


def cache_keyword(model: nn.Module) -> str:
    """The keyword under which ``model``'s forward takes (and its output returns) the KV cache."""
    parameters = inspect.signature(model.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def last_logits_only(model: nn.Module) -> dict[str, int]:
    """The keyword that makes the prompt's forward compute the logits of its last position
    only (the one the first token is sampled from), where the model's forward takes it: the
    [N, P, V] logits of the whole prompt are never read."""
    forward = inspect.signature(model.forward).parameters
    return {"logits_to_keep": 1} if "logits_to_keep" in forward else {}


def prefill(
    model: nn.Module,
    keyword: str,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    positions: Tensor,
    group_size: int,
) -> Any:
    """The prompts' forward that starts the decoding, with its cache: each prompt once when
    its ``group_size`` consecutive rows repeat it and the cache can repeat its rows
    (``batch_repeat_interleave``, transformers' caches), then the last logits and the cache
    repeated row by row; every row's forward otherwise. A row's keys, values and logits depend
    only on that row, so the repeated ones are the rows' own (up to the products' rounding)."""

    def forward(every: int) -> Any:  # the rows 0, every, 2·every, …
        return model(
            input_ids=prompt_ids[::every],
            attention_mask=prompt_mask[::every],
            position_ids=positions[::every],
            use_cache=True,
            **last_logits_only(model),
        )

    out = forward(group_size)
    if group_size == 1:
        return out
    cache = getattr(out, keyword, None)
    if cache is None or not hasattr(cache, "batch_repeat_interleave"):
        return forward(1)
    cache.batch_repeat_interleave(group_size)
    out.logits = out.logits.repeat_interleave(group_size, dim=0)
    return out


@dataclass(frozen=True)
class Rollout:
    sequences: Sequences
    rollout_logp: Tensor  # [N, T] log μ(y_t) at completion tokens, 0 elsewhere (float32 or 64)
    completions: list[str]  # decoded completion text (special tokens dropped)
    stopped: int  # sequences that emitted EOS
    kept_ids: Tensor | None = None  # [N, T, K] K_t's ids (−1 padding); None: no truncation
    kept_log_mass: Tensor | None = None  # [N, T] log S^μ_t (0 off the completion)


def truncates(top_p: float, top_k: int) -> bool:
    """Whether top-p / top-k leave out any token at all."""
    return top_p < 1.0 or top_k > 0


def kept_prefix(probs: Tensor, top_p: float, top_k: int) -> tuple[Tensor, Tensor]:
    """([N, V] ids sorted by descending probability, [N] |K_t|): K_t is the first |K_t| of them.

    Top-k keeps the k most probable (k = 0: all); top-p then keeps the smallest prefix of those,
    renormalised, whose mass reaches top_p (the tokens whose predecessors' mass is < top_p: the
    top token is always kept)."""
    sorted_p, order = probs.sort(dim=-1, descending=True)  # [N, V]
    rank = torch.arange(probs.shape[-1], device=probs.device)
    keep = rank < top_k if top_k > 0 else torch.ones_like(sorted_p, dtype=torch.bool)
    kept_p = sorted_p * keep
    kept_p = kept_p / kept_p.sum(-1, keepdim=True)
    before = kept_p.cumsum(-1) - kept_p  # mass of the kept tokens ranked above
    keep = keep & (before < top_p)
    return order, keep.sum(-1)


def prefix_ids(order: Tensor, count: Tensor, width: int) -> Tensor:
    """[N, width] the first ``count`` ids of each row of ``order``, −1 after them."""
    ids = order[:, :width]
    inside = torch.arange(width, device=order.device) < count[:, None]
    return torch.where(inside, ids, torch.full_like(ids, -1))


@torch.no_grad()
def sample(
    model: nn.Module,
    tokenizer: Any,
    prompts: list[list[int]],
    group_size: int,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    gen: torch.Generator,
    device: torch.device,
    stop: list[int] | None = None,
    top_k: int = 0,
) -> Rollout:
    """``group_size`` completions of each prompt, consecutive in the batch; a completion ends
    at a token of ``stop`` (default: the tokenizer's EOS). With ``top_p`` < 1 or ``top_k`` the
    kept sets K_t and their rollout masses come back too."""
    eos = tokenizer.eos_token_id
    if stop is None:
        stop = [] if eos is None else [int(eos)]
    stop_ids = torch.tensor(stop, dtype=torch.long, device=device)
    pad = stop[0] if stop else (tokenizer.pad_token_id or 0)
    rows = [p for p in prompts for _ in range(group_size)]
    n, width = len(rows), max(len(p) for p in rows)
    prompt_ids = torch.full((n, width), pad, dtype=torch.long)
    prompt_mask = torch.zeros(n, width, dtype=torch.long)
    for i, p in enumerate(rows):
        prompt_ids[i, width - len(p) :] = torch.tensor(p)
        prompt_mask[i, width - len(p) :] = 1
    prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)
    positions = position_ids(prompt_mask)  # [N, P]

    new_tokens = torch.full((n, max_new_tokens), pad, dtype=torch.long, device=device)
    alive = torch.zeros(n, max_new_tokens, dtype=torch.bool, device=device)
    done = torch.zeros(n, dtype=torch.bool, device=device)
    step_ids: list[Tensor] = []  # per step [N, K_step] K_t's ids, −1 padding
    step_mass = torch.zeros(n, max_new_tokens, dtype=torch.float32, device=device)
    truncated = truncates(top_p, top_k)

    keyword = cache_keyword(model)
    out = prefill(model, keyword, prompt_ids, prompt_mask, positions, group_size)
    acc = accumulation_dtype(out.logits.dtype)  # float32 (float64 for a float64 model)
    new_logp = torch.zeros(n, max_new_tokens, dtype=acc, device=device)
    attn = prompt_mask
    last_pos = positions[:, -1:]
    for k in range(max_new_tokens):
        report("sampling", k, max_new_tokens)
        logits = out.logits[:, -1].to(acc) / temperature  # [N, V]
        log_probs = torch.log_softmax(logits, dim=-1)
        probs = log_probs.exp()
        if truncated:
            order, count = kept_prefix(probs, top_p, top_k)
            ranks = torch.arange(probs.shape[-1], device=device) < count[:, None]
            keep = torch.zeros_like(ranks).scatter(-1, order, ranks)  # [N, V]
            probs = probs * keep
            step_mass[:, k] = torch.logsumexp(log_probs.masked_fill(~keep, -torch.inf), dim=-1)
            ids = prefix_ids(order, count, int(count.max()))
            step_ids.append(torch.where(done[:, None], torch.full_like(ids, -1), ids))
        y = draw(probs.cpu(), gen).to(device)  # [N]
        y = torch.where(done, torch.full_like(y, pad), y)
        alive[:, k] = ~done
        new_tokens[:, k] = y
        new_logp[:, k] = log_probs.gather(-1, y[:, None]).squeeze(-1)
        if stop:
            done = done | torch.isin(y, stop_ids)
        if k == max_new_tokens - 1 or bool(done.all()):
            break
        attn = torch.cat([attn, torch.ones_like(attn[:, :1])], dim=1)
        last_pos = last_pos + 1
        out = model(
            input_ids=y[:, None],
            attention_mask=attn,
            position_ids=last_pos,
            use_cache=True,
            **{keyword: getattr(out, keyword)},
        )
    report("sampling", max_new_tokens, max_new_tokens)

    steps = int(alive.any(0).sum())  # columns sampled before everyone stopped
    new_tokens, new_logp, alive = new_tokens[:, :steps], new_logp[:, :steps], alive[:, :steps]
    input_ids = torch.cat([prompt_ids, new_tokens], dim=1)  # [N, L]
    attention_mask = torch.cat([prompt_mask, alive.long()], dim=1)  # [N, L]
    loss_mask = torch.zeros(n, width + steps - 1, dtype=torch.bool, device=device)  # [N, T]
    loss_mask[:, width - 1 :] = alive
    rollout_logp = torch.zeros(loss_mask.shape, dtype=acc, device=device)
    rollout_logp[:, width - 1 :] = torch.where(alive, new_logp, torch.zeros_like(new_logp))

    kept_ids = kept_mass = None
    if truncated:
        width_k = max(int(t.shape[1]) for t in step_ids[:steps])
        kept_ids = torch.full((*loss_mask.shape, width_k), -1, dtype=torch.long, device=device)
        for j, ids in enumerate(step_ids[:steps]):
            kept_ids[:, width - 1 + j, : ids.shape[1]] = ids
        kept_mass = torch.zeros(loss_mask.shape, dtype=torch.float32, device=device)
        kept_mass[:, width - 1 :] = torch.where(alive, step_mass[:, :steps], 0.0)

    completions = []
    for i in range(n):
        kept = new_tokens[i][alive[i]].tolist()
        completions.append(tokenizer.decode(kept, skip_special_tokens=True))
    stopped = int(torch.isin(new_tokens, stop_ids).logical_and(alive).any(-1).sum())
    return Rollout(
        Sequences(input_ids, attention_mask, position_ids(attention_mask), loss_mask),
        rollout_logp,
        completions,
        stopped,
        kept_ids,
        kept_mass,
    )
