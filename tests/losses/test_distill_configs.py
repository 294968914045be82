"""The shipped distillation configs (configs/literal_tc30–33) reproduce their hand-computed
values: forward KL, reverse KL, β-JSD (full form) and verl's top-k forward KL, each added to
REINFORCE on two tokens (A = 0: the term alone; A = +1: the policy gradient plus the term). The
arithmetic is in each config's comment and repeated here. Also: a literal teacher that breaks
the validation rule is refused naming the position's field."""

from __future__ import annotations

import math

import pytest
from helpers import ABS, CONFIGS, SIX

from gradlens.compare import run_compare
from gradlens.config import build_config, validate
from gradlens.errors import GradlensError
from gradlens.results import CompareReport

PI, Q = [0.5, 0.3, 0.2], [0.6, 0.3, 0.1]
POLICY = [-0.5, 0.3, 0.2]  # −A·(e_0 − π) at A = +1
REINFORCE_LOSS = -math.log(0.5)  # −A·ln π_y = 0.693147 at A = +1


def run(name: str) -> CompareReport:
    report = run_compare(build_config(CONFIGS / name))
    assert report.passed, [c for c in report.checks if not c.passed]
    return report


def check(report: CompareReport, term: list[float], divergence: float, tol: float) -> None:
    """Token 0 (A = 0) carries the term alone, token 1 (A = +1) the policy gradient plus the
    term; the loss is −ln π_y + 2·D; the zero-sum check passes."""
    (r,) = report.losses
    assert r.tokens is not None
    assert r.tokens[0].grad_logits == pytest.approx(term, abs=tol)
    both = [p + t for p, t in zip(POLICY, term, strict=True)]
    assert r.tokens[1].grad_logits == pytest.approx(both, abs=tol)
    for token in r.tokens:
        assert sum(token.grad_logits) == pytest.approx(0.0, abs=ABS)  # type: ignore[arg-type]
    assert r.loss == pytest.approx(REINFORCE_LOSS + 2 * divergence, abs=tol)
    assert r.zero_sum.passed
    assert r.tokens[0].coefficient == 0.0  # c_t excludes the dense term


def test_tc30_forward_kl() -> None:
    # D = 0.6·ln 1.2 + 0.3·ln 1 + 0.1·ln 0.5 = 0.109393 − 0.069315 = 0.040078; π − q
    report = run("literal_tc30_forward_kl.yaml")
    divergence = sum(q * math.log(q / p) for p, q in zip(PI, Q, strict=True))
    assert divergence == pytest.approx(0.040078, abs=SIX)
    check(report, [-0.1, 0.0, 0.1], divergence, ABS)
    assert report.losses[0].tokens[1].grad_logits == pytest.approx([-0.6, 0.3, 0.3], abs=ABS)  # type: ignore[index]


def test_tc31_reverse_kl() -> None:
    # D = 0.5·ln(5/6) + 0.2·ln 2 = 0.047469; π_v·(ln(π_v/q_v) − D)
    report = run("literal_tc31_reverse_kl.yaml")
    divergence = sum(p * math.log(p / q) for p, q in zip(PI, Q, strict=True))
    assert divergence == pytest.approx(0.047469, abs=SIX)
    term = [p * (math.log(p / q) - divergence) for p, q in zip(PI, Q, strict=True)]
    assert term == pytest.approx([-0.114895, -0.014241, 0.129136], abs=SIX)
    check(report, term, divergence, ABS)


def test_tc32_jsd() -> None:
    # m = [0.55, 0.3, 0.15]; KL(q‖m) = 0.011660, KL(π‖m) = 0.009881; D = 0.010771;
    # (1 − β)·π_v·(ln(π_v/m_v) − KL(π‖m))
    report = run("literal_tc32_jsd.yaml")
    m = [0.5 * q + 0.5 * p for p, q in zip(PI, Q, strict=True)]
    kl_qm = sum(q * math.log(q / x) for q, x in zip(Q, m, strict=True))
    kl_pm = sum(p * math.log(p / x) for p, x in zip(PI, m, strict=True))
    divergence = 0.5 * kl_qm + 0.5 * kl_pm
    assert (kl_qm, kl_pm, divergence) == pytest.approx((0.011660, 0.009881, 0.010771), abs=SIX)
    term = [0.5 * p * (math.log(p / x) - kl_pm) for p, x in zip(PI, m, strict=True)]
    assert term == pytest.approx([-0.026298, -0.001482, 0.027780], abs=SIX)
    check(report, term, divergence, ABS)


def test_tc33_top_k_forward_kl() -> None:
    # K = {0, 2}, q_K = [0.6, 0.3]: D = 0.6·ln 1.2 + 0.3·ln 1.5 = 0.231032;
    # π_v·Σ_K q − q_v·1[v∈K] = [0.45 − 0.6, 0.27, 0.18 − 0.3] = [−0.15, 0.27, −0.12]
    report = run("literal_tc33_topk_forward_kl.yaml")
    divergence = 0.6 * math.log(0.6 / 0.5) + 0.3 * math.log(0.3 / 0.2)
    assert divergence == pytest.approx(0.231032, abs=SIX)
    check(report, [-0.15, 0.27, -0.12], divergence, ABS)


def literal(**teacher: object) -> dict:
    position = {"probs": PI, "token": 0, "advantage": 1.0, **teacher}
    return {
        "dtype": "float64",
        "losses": ["reinforce"],
        "loss": {"distill": {"form": "top_k"}},
        "source": {"kind": "literal", "sequences": [{"positions": [position]}]},
    }


@pytest.mark.parametrize(
    ("teacher", "expected"),
    [
        (
            {"teacher_topk_ids": [0, 3], "teacher_topk_probs": [0.6, 0.3]},
            "source.sequences[0].positions[0].teacher_topk_ids: token id 3 is outside the "
            "vocabulary [0, 3)",
        ),
        (
            {"teacher_topk_ids": [2, 2], "teacher_topk_probs": [0.6, 0.3]},
            "source.sequences[0].positions[0].teacher_topk_ids: token id 2 appears twice",
        ),
    ],
)
def test_a_malformed_literal_teacher_names_its_field(teacher: dict, expected: str) -> None:
    with pytest.raises(GradlensError) as info:
        run_compare(validate(literal(**teacher)))
    assert expected in str(info.value)


@pytest.mark.parametrize(
    ("teacher", "expected"),
    [
        ({"teacher_probs": [0.5, 0.5]}, "the teacher's distribution has 2 entries"),
        ({"teacher_probs": [0.6, 0.3, 0.3]}, "teacher_probs must sum to 1"),
        ({"teacher_topk_ids": [0]}, "give teacher_topk_ids and teacher_topk_probs together"),
        ({"teacher_topk_ids": [0], "teacher_topk_probs": [1.5]}, "must lie in (0, 1]"),
    ],
)
def test_a_literal_teacher_the_config_refuses(teacher: dict, expected: str) -> None:
    with pytest.raises(GradlensError) as info:
        validate(literal(**teacher))
    assert expected in str(info.value)
