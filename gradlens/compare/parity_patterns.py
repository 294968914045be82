"""Why two losses' coefficients differ, said in words, where one explanation fits exactly.

Parity (`gradlens.compare.parity`) compares c_A and c_B token by token. When they differ, the
ratio q_t = c_B,t/c_A,t on the tokens where both are non-zero usually has a structure that
names the cause:

Aggregation. Every aggregation weight is a monomial in the batch's counts, a_t = 1/D with D a
product of N_tok, S (B' or B), |y_i| and L (`gradlens.losses.aggregation`), so between two
aggregations x (A) and y (B) of the same surrogate

    q_t = a_y,t / a_x,t = D_x / D_y,      e.g. token_mean → seq_mean_token_mean:
                                                N_tok/(B'·|y_i|), constant within a sequence

and the ratio of the monomials, with common symbols cancelled, names the factor: N_tok (a sum
where the other averages), B'/B (empty rows counted or not), 1/B' (Σ/L vs Σ/(B'·L)). The
same monomials computed on the mask without the tokens a correction rejected (N_kept,
B'_kept, |y_i|_kept) name a renormalising rejection: verl's rejection sampling removes the
rejected tokens from the response mask, so q = N_tok/N_kept under token-mean. Every pair of
(mode, S, kept) is tried; the first whose ratio matches q on every common token to
PATTERN_RTOL is reported, the run's own aggregation first.

Otherwise, in this order: a constant factor k on every common token (with the batch count it
equals, if any); q constant within each sequence but not across them, where
q_i = |y_i|/(|y_i| + ε) with one small ε is an epsilon added to the sequence length (verl's
and OpenRLHF's |y_i| + 1e-8); q = k·r_t^{±1}, an importance weight r = π_θ/π_old in one
implementation only; tokens zero in one loss only (a clip or mask rule differs). A float64 gap
between 1e-9 and 1e-6 with no structure is float32 rounding on one side.

Pure computation on [N, T] tensors; the words are the output.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
from torch import Tensor

from gradlens.containers import Batch
from gradlens.losses import Aggregation
from gradlens.losses.corrections import KINDS

PATTERN_RTOL = 1e-6  # a per-token ratio counts as constant (or matched) within this spread
EPS_RTOL = 1e-3  # the fitted ε of a sequence-length epsilon agrees across sequences to this
FLOAT32_GAP = (1e-9, 1e-6)  # a structureless float64 gap in this range is float32 rounding
REJECTION_REGIONS = tuple(kind.region for kind in KINDS.values() if kind.masks)

# Each mode's weight as 1/D: the symbols of D ("S" is B' or B, the counted sequences).
DENOMINATORS: dict[str, tuple[str, ...]] = {
    "token_mean": ("N_tok",),
    "token_sum": (),
    "seq_mean_token_mean": ("S", "|y_i|"),
    "seq_mean_token_sum": ("S",),
    "token_sum_norm": ("L",),
    "seq_mean_token_sum_norm": ("S", "L"),
}


@dataclass(frozen=True)
class Variant:
    """One aggregation as a hypothesis: its mode, what S counts, and on which mask."""

    mode: str
    all_rows: bool
    kept: bool

    def symbols(self) -> tuple[str, ...]:
        out = []
        for s in DENOMINATORS[self.mode]:
            s = ("B" if self.all_rows else "B'") if s == "S" else s
            if self.kept and s in ("N_tok", "B'", "|y_i|"):
                s = {"N_tok": "N_kept", "B'": "B'_kept", "|y_i|": "|y_i|_kept"}[s]
            out.append(s)
        return tuple(out)

    def words(self) -> str:
        text = self.mode
        if self.all_rows and "S" in DENOMINATORS[self.mode]:
            text += " over all B rows (count_empty_sequences)"
        if self.kept:
            text += " without the rejected tokens (renormalize: true; verl's rollout_rs)"
        return text


def _counts(mask: Tensor, kept: Tensor, length_scale: float) -> dict[str, Tensor]:
    """Each symbol's value, [N, 1] or a scalar, as float64."""
    m, k = mask.double(), kept.double()
    return {
        "N_tok": m.sum(),
        "N_kept": k.sum().clamp(min=1),
        "B": torch.tensor(float(mask.shape[0]), dtype=torch.float64),
        "B'": (m.sum(-1) > 0).sum().double().clamp(min=1),
        "B'_kept": (k.sum(-1) > 0).sum().double().clamp(min=1),
        "|y_i|": m.sum(-1, keepdim=True).clamp(min=1),
        "|y_i|_kept": k.sum(-1, keepdim=True).clamp(min=1),
        "L": torch.tensor(length_scale, dtype=torch.float64),
    }


def _monomial(symbols: Counter[str]) -> str:
    parts = [s for s, n in sorted(symbols.items()) for _ in range(n)]
    return "·".join(parts)


def ratio_text(x: Variant, y: Variant) -> str:
    """a_y/a_x = D_x/D_y with the common symbols cancelled, e.g. ``N_tok/(B'·|y_i|)``."""
    num, den = _reduced(x, y)
    top = _monomial(num) or "1"
    if not den:
        return top
    bottom = _monomial(den)
    return f"{top}/({bottom})" if sum(den.values()) > 1 else f"{top}/{bottom}"


def _value(symbols: tuple[str, ...], counts: dict[str, Tensor]) -> Tensor:
    out = torch.ones((), dtype=torch.float64)
    for s in symbols:
        out = out * counts[s]
    return out


def is_constant(x: Tensor, rtol: float = PATTERN_RTOL) -> float | None:
    """The common value of ``x`` if all its entries agree to ``rtol``, else None."""
    if x.numel() == 0 or not bool(torch.isfinite(x).all()):
        return None
    mid = float(x.median())
    if mid == 0.0 or float((x - mid).abs().max()) > rtol * abs(mid):
        return None
    return mid


def _reduced(x: Variant, y: Variant) -> tuple[Counter[str], Counter[str]]:
    """a_y/a_x = D_x/D_y as (numerator, denominator) symbols, common ones cancelled."""
    dx, dy = Counter(x.symbols()), Counter(y.symbols())
    common = dx & dy
    return dx - common, dy - common


def _per_token(symbols: Counter[str]) -> bool:
    return any(s.startswith("|y_i|") for s in symbols)


@dataclass(frozen=True)
class Pair:
    """What parity knows about the two losses besides their coefficients."""

    aggregation: Aggregation  # the run's
    a_aggregates_itself: bool
    b_aggregates_itself: bool
    rejected: Tensor  # [N, T] tokens a masking correction rejected, on either side


def aggregation_notes(batch: Batch, q: Tensor, both: Tensor, pair: Pair) -> list[str]:
    """The first pair of aggregations whose weight ratio is q on every common token."""
    mask = batch.mask
    kept = mask & ~pair.rejected
    scale = pair.aggregation.loss_scale_factor or float(mask.shape[-1])
    counts = _counts(mask, kept, scale)
    empty_rows = int((mask.sum(-1) == 0).sum()) > 0
    rejection = bool((pair.rejected & mask).any())
    variants = [
        Variant(mode, all_rows, kept_)
        for mode in DENOMINATORS
        for all_rows in ((False, True) if empty_rows else (pair.aggregation.count_empty_sequences,))
        for kept_ in ((False, True) if rejection else (False,))
    ]
    run = Variant(pair.aggregation.mode, pair.aggregation.count_empty_sequences, False)
    # the run's own aggregation first: the side that is gradlens's built-in loss uses it
    variants.sort(key=lambda v: v != run)
    weights = {v: 1.0 / _value(v.symbols(), counts) for v in variants}  # [N, 1] or scalar
    grid = torch.zeros(mask.shape, dtype=torch.float64)
    for x in variants:
        for y in variants:
            if x == y:
                continue
            expected = (weights[y] / weights[x] + grid)[both]  # a_y/a_x on the common tokens
            if bool(((expected - 1).abs() <= PATTERN_RTOL).all()):
                continue  # the two weights coincide on this batch: no difference to explain
            if not bool(((q - expected).abs() <= PATTERN_RTOL * expected.abs()).all()):
                continue
            text = ratio_text(x, y)
            num, den = _reduced(x, y)
            scalar = not _per_token(num + den)
            value = ""
            if scalar:
                k = float(expected[0])
                top, bottom = _numbers(num, counts), _numbers(den, counts)
                value = f" = {top}/{bottom} = {k:.6g}" if bottom != "1" else f" = {k:.6g}"
            where = "on every token" if scalar else "constant within each sequence"
            return [
                f"{where}: ratio c_B/c_A = {text}{value}, i.e. {x.words()} (A) vs {y.words()} "
                "(B): the same surrogate, aggregated differently"
            ]
    return []


def _numbers(symbols: Counter[str], counts: dict[str, Tensor]) -> str:
    if not symbols:
        return "1"
    value = 1.0
    for s, n in symbols.items():
        value *= float(counts[s]) ** n
    return f"{value:g}"


def epsilon_note(batch: Batch, q: Tensor, both: Tensor) -> list[str]:
    """q_i = |y_i|/(|y_i| + ε) per sequence with one small ε: an epsilon on the length."""
    lengths = batch.mask.double().sum(-1, keepdim=True).expand(batch.mask.shape)[both]
    if not bool((q < 1).all()) and not bool((q > 1).all()):
        return []
    eps = lengths * (1 / q - 1)  # B divides by |y_i| + ε where A divides by |y_i|
    value = is_constant(eps, EPS_RTOL)
    if value is None or abs(value) > 1e-3:
        return []
    side = "B" if value > 0 else "A"
    return [
        f"c_B/c_A = |y_i|/(|y_i| + ε) within each sequence with ε = {abs(value):.3g} on the "
        f"side of {side}: an epsilon added to the sequence length (verl's and OpenRLHF's "
        "|y_i| + 1e-8); a relative gap of at most ε/min|y_i|, harmless"
    ]


def per_sequence_note(batch: Batch, q: Tensor, both: Tensor) -> list[str]:
    """q constant within each sequence, not across them: a per-sequence normaliser differs."""
    rows = torch.nonzero(both, as_tuple=True)[0]
    values = []
    for i in rows.unique().tolist():
        k = is_constant(q[rows == i])
        if k is None:
            return []
        values.append(k)
    if len(values) < 2 or is_constant(torch.tensor(values, dtype=torch.float64)) is not None:
        return []
    return [
        f"c_B/c_A is constant within each sequence but not across them ({min(values):.6g} to "
        f"{max(values):.6g}): a per-sequence normaliser differs (|y_i|, a sequence weight)"
    ]


def constant_factor(batch: Batch, k: float) -> str:
    """A guess at what a constant factor is, from the batch's counts."""
    m = batch.mask
    b_prime = float(m.any(-1).sum())
    counts = {
        "the number of valid tokens N_tok": float(m.sum()),
        "the number of sequences with a token B'": b_prime,
        "the number of rows B": float(m.shape[0]),
        "the padded length T": float(m.shape[-1]),
        "the mean sequence length": float(m.sum()) / max(b_prime, 1.0),
        "B'/B, the share of rows with a token": b_prime / max(float(m.shape[0]), 1.0),
    }
    for label, value in counts.items():
        if value in (0.0, 1.0):
            continue
        if abs(k - value) <= PATTERN_RTOL * value:
            return f" = {label} ({value:g})"
        if abs(k * value - 1) <= PATTERN_RTOL:
            return f" = 1/{label} (1/{value:g})"
    return ""
