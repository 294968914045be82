"""The worst tokens of the gap, decoded, and what each correction does to them (by hand)."""

from __future__ import annotations

import math

import torch

from gradlens.diagnostics.token_text import TokenTexts
from gradlens.diagnostics.worst_tokens import (
    DEFAULT_PROBES,
    correction_label,
    probe_corrections,
    worst_tokens,
)
from gradlens.losses.base import Correction

F64 = torch.float64


class Letters:
    """A tokenizer whose token v is the letter chr(97 + v)."""

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(97 + i) for i in ids)


def two_sequences() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """seq 0: π_old = [.5, .2, .9], μ = [.5, .05, .9] → Δ = [0, ln 4, 0];
    seq 1 (first column masked): π_old = [., .1, .6], μ = [., .25, .6] → Δ = [., ln .4, 0]."""
    old = torch.tensor([[0.5, 0.2, 0.9], [0.7, 0.1, 0.6]], dtype=F64).log()
    rollout = torch.tensor([[0.5, 0.05, 0.9], [0.2, 0.25, 0.6]], dtype=F64).log()
    mask = torch.tensor([[True, True, True], [False, True, True]])
    return old, rollout, mask


def effects(token) -> dict[str, tuple[float | None, str]]:
    return {
        e.correction.split("[")[0].split("≤")[0]: (e.weight, e.action) for e in token.corrections
    }


def test_top_tokens_and_what_each_correction_does() -> None:
    old, rollout, mask = two_sequences()
    texts = TokenTexts(Letters(), [[0, 1, 2], [3, 4]], torch.tensor([[0, 1, 2], [-1, 0, 1]]), mask)
    first, second = worst_tokens(old, rollout, mask, 2, probe_corrections(()), texts)
    # |Δ| = ln 4 = 1.386 first, then |ln 0.4| = 0.916
    assert (first.sequence, first.position) == (0, 1)
    assert (second.sequence, second.position) == (1, 0)  # the first valid token of seq 1
    assert math.isclose(first.rho, 4.0) and math.isclose(second.rho, 0.4)
    assert math.isclose(first.old_prob, 0.2) and math.isclose(first.rollout_prob, 0.05)
    assert first.token == "b" and first.context == "a«b»c"
    assert second.token == "d" and second.context == "«d»e"
    a, b = effects(first), effects(second)
    # token TIS ≤ 2: ρ = 4 truncated to 2; ρ = 0.4 has no lower bound: kept at 0.4
    assert a["token_tis"] == (2.0, "truncated") and b["token_tis"][1] == "kept"
    assert math.isclose(b["token_tis"][0], 0.4)
    # token MIS ≤ 3 masks ρ = 4; IcePop [0.5, 5] keeps 4 and masks 0.4
    assert a["token_mis"] == (0.0, "masked") and b["token_mis"][1] == "kept"
    assert a["icepop"][1] == "kept" and math.isclose(a["icepop"][0], 4.0)
    assert b["icepop"] == (0.0, "masked")
    # sequence MIS ≤ 3: seq 0's Π ρ = 4 masked, seq 1's 0.4 kept
    assert a["seq_mis"] == (0.0, "masked") and b["seq_mis"][1] == "kept"
    # geometric mask [0.999, 1.001]: exp(ln 4/3) = 1.587 and exp(ln 0.4/2) = 0.632, both out
    assert a["geo_mask"] == (0.0, "masked") and b["geo_mask"] == (0.0, "masked")
    # token_k3 ≤ 0.005: k3 = 4 − 1 − ln 4 = 1.614 and 0.4 − 1 + 0.916 = 0.316, both out
    assert a["token_k3"] == (0.0, "masked") and b["token_k3"] == (0.0, "masked")


def test_a_configured_correction_replaces_the_default_of_its_kind() -> None:
    own = Correction("token_tis", None, 1.5)
    probes = probe_corrections((own, own))
    assert probes[0] == own and [c.kind for c in probes].count("token_tis") == 1
    assert len(probes) == len(DEFAULT_PROBES)
    assert correction_label(own) == "token_tis≤1.5"
    assert correction_label(Correction("icepop", 0.5, 5.0)) == "icepop[0.5,5]"


def test_no_tokenizer_and_k_larger_than_the_batch() -> None:
    old, rollout, mask = two_sequences()
    tokens = worst_tokens(old, rollout, mask, 10, (), None)
    assert len(tokens) == 5 and tokens[0].token is None and tokens[0].corrections == []
    assert [t.log_diff for t in tokens][2:] == [0.0, 0.0, 0.0]
