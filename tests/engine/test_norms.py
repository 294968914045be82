"""Row norms that neither underflow nor overflow (gradlens/engine/norms.py): exact to rounding at
every scale float32 and float64 hold, where the plain sum of squares gives 0 or inf."""

from __future__ import annotations

import pytest
import torch

from gradlens.engine.norms import safe_range, safe_row_norms


def reference(rows: torch.Tensor) -> torch.Tensor:
    """Σ r² in exact rational steps: float64 of the row scaled by a power of two."""
    wide = rows.double()
    shift = torch.frexp(wide.abs().amax(dim=1).clamp(min=1e-300))[1]
    scaled = torch.ldexp(wide, -shift[:, None])  # exact: a power of two
    return torch.ldexp(scaled.norm(dim=1), shift)


@pytest.mark.parametrize(
    ("dtype", "scale"),
    [
        (torch.float32, 1e-30),  # squares below float32's range: torch's norm gives 0
        (torch.float32, 1e-20),  # squares subnormal: a few bits left
        (torch.float32, 1e-3),
        (torch.float32, 1e25),  # squares beyond float32's range: inf
        (torch.float64, 1e-200),
        (torch.float64, 1e180),
    ],
)
def test_row_norms_are_exact_to_rounding_at_every_scale(dtype, scale):
    gen = torch.Generator().manual_seed(0)
    rows = (torch.randn(64, 576, generator=gen, dtype=torch.float64) * scale).to(dtype)
    rows[3] = 0.0  # an exactly zero row keeps its 0
    rows[5, 7:] = 0.0  # a row of a few entries
    expected = reference(rows)
    got = safe_row_norms(rows)
    u = torch.finfo(dtype).eps / 2
    assert got.dtype == dtype
    assert float(got[3]) == 0.0
    assert float(((got.double() - expected).abs() / expected.clamp(min=1e-300)).max()) <= 4 * u
    plain = rows.norm(dim=1).double()
    low, high = safe_range(dtype)
    if not low <= scale * 576**0.5 <= high:  # the hazard is real at this scale
        assert float(((plain - expected).abs() / expected.clamp(min=1e-300)).max()) > 8 * u


def test_rows_with_an_infinity_or_a_nan_keep_what_the_plain_norm_makes_of_them():
    rows = torch.ones(3, 8)
    rows[1, 2] = torch.inf
    rows[2, 0] = torch.nan
    got = safe_row_norms(rows)
    assert float(got[0]) == pytest.approx(8**0.5) and torch.isinf(got[1]) and torch.isnan(got[2])


def test_only_rows_outside_the_safe_range_are_recomputed(monkeypatch):
    rows = torch.ones(5, 8)
    rows[2] *= 1e-30
    rows[3:] = 0.0  # exactly zero rows keep their 0 without being gathered
    seen = []
    original = torch.Tensor.to

    def spy(self, *args, **kwargs):
        if args and args[0] is torch.float64:
            seen.append(self.shape[0])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", spy)
    got = safe_row_norms(rows)
    assert seen == [1]  # row 2 alone
    assert float(got[2]) == pytest.approx(8**0.5 * 1e-30, rel=1e-6)
    assert got[3:].tolist() == [0.0, 0.0]
