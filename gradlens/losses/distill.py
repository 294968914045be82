"""Distribution-level distillation: forward KL, reverse KL and β-JSD to a teacher, full and top-k.

These losses read the student's whole distribution π_t = softmax(z_t), not only ℓ_t = log π_t(y_t),
so their logit gradient is a dense vector per token, not c_t·(e_y − π_t). It still sums to zero
over the vocabulary. They enter every loss of a run the way the entropy bonus does
(``loss.distill``, `gradlens.losses.base.Distill`): L = L_policy + λ·Σ_t a_t·D_t, with a_t the
run's aggregation weights and λ = ``coef``.

One derivation covers them all. Write a divergence as a sum of per-entry terms
D_t = Σ_{v∈S_t} φ(l_v, lq_v), with l_v = log π_t(v), lq_v = log q_t(v) and S_t the whole
vocabulary (``full``) or the teacher's top-k ids K_t (``top_k``; the sums are not renormalised
over K_t, as verl's ``forward_kl_topk``). Since ∂l_j/∂z_v = 1[j = v] − π_v,

    ∂D_t/∂z_v = ψ_v·1[v ∈ S_t] − π_v·Σ_{j∈S_t} ψ_j,     ψ_j = ∂φ/∂l_j,

which sums to zero over v because Σ_v π_v = 1. With u_v = ψ_v on S_t and 0 elsewhere, the
gradient is u − π·Σu; the code computes exactly that (`token_terms`, `dense_grad`).

Forward KL (verl ``forward_kl_topk``, TRL GKD β = 0), q = e^{lq}:
    φ = q·(lq − l),                      ψ = −q
    full:  ∂D/∂z_v = π_v − q_v;          top-k:  ∂D/∂z_v = π_v·Σ_{k∈K} q_k − q_v·1[v ∈ K].
    Zero when π = q (full), or q vanishes on K (top-k).

Reverse KL (TRL GKD β = 1), π = e^{l}:
    φ = π·(l − lq),                      ψ = π·(l − lq + 1)
    full:  ∂D/∂z_v = π_v·(l_v − lq_v − D_t)  (the +1 cancels against Σπ = 1).

β-JSD (TRL ``generalized_jsd_loss``, 0 < β < 1), the mixture m = β·q + (1 − β)·π:
    φ = β·q·(lq − log m) + (1 − β)·π·(l − log m)
    ψ = (1 − β)·π·(l − log m)
    (∂φ/∂l = (1 − β)π·(l − log m + 1) − (β q + (1 − β)π)(1 − β)π/m = (1 − β)π·(l − log m)).
    TRL takes β = 0 to be forward KL and β = 1 reverse KL, and so does gradlens; note these are
    not the limits of the formula (it tends to 0 at both ends): a trap when sweeping β.

verl's ``log_prob_min_clamp`` c (default −10 in verl's config, None here): l and lq are floored
at c before φ; an entry whose l is below c carries no gradient (u_v = 0 there; the clamp's
derivative is 0), and q is read as e^{max(lq, c)}. verl also clamps the per-token loss at 0 from
below and at ``loss_max_clamp`` (10) from above; gradlens reports D_t unclamped (docs/losses.md).

The teacher is a second hidden/weight pair (q_t = softmax(W' h'_t + b'), both forms; the top-k
form takes the pair's top ``top_k``), its stored logits (the same), or stored top-k ids and
log-probs (top-k form only).
The sampled-token form, on-policy distillation, is an ordinary c-form loss (`gradlens.losses.opd`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from gradlens.containers import Teacher
from gradlens.errors import GradlensError
from gradlens.logits import Normaliser, log_probs
from gradlens.losses.base import Distill

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
# where a teacher comes from, for the messages of a run that has none
NO_TEACHER_HINT = (
    "give one: source.teacher: perturbed (synthetic), source.teacher_path (model), teacher_* "
    "keys in a batch file (teacher_hidden and teacher_weight or teacher_logits, both forms; "
    "teacher_topk_ids and teacher_topk_logp, form top_k) or teacher_* fields on literal "
    "positions"
)
FORMS = ("full", "top_k")

# formula, dense logit gradient (full form), paper: for `gradlens losses` and the docs
DESCRIPTIONS: dict[str, tuple[str, str, str]] = {
    "forward_kl": (
        "KL(q‖π) = Σ_v q_v (log q_v − log π_v)",
        "π_v − q_v (top-k: π_v·Σ_K q − q_v·1[v∈K])",
        "Hinton et al. 2015; verl `forward_kl_topk`; TRL GKD β = 0",
    ),
    "reverse_kl": (
        "KL(π‖q) = Σ_v π_v (log π_v − log q_v)",
        "π_v·(log π_v − log q_v − KL)",
        "Gu et al. 2024 (MiniLLM); TRL GKD β = 1",
    ),
    "jsd": (
        "β·KL(q‖m) + (1 − β)·KL(π‖m),  m = β q + (1 − β) π",
        "(1 − β)·π_v·(log(π_v/m_v) − KL(π‖m))",
        "Agarwal et al. 2024 (GKD) eq. 1; TRL `generalized_jsd_loss`",
    ),
}


def effective(d: Distill) -> str:
    """The divergence ``d`` computes: jsd at β = 0 or 1 is TRL's forward or reverse KL."""
    if d.divergence == "jsd" and d.beta == 0.0:
        return "forward_kl"
    if d.divergence == "jsd" and d.beta == 1.0:
        return "reverse_kl"
    return d.divergence


def pointwise(divergence: str, beta: float, lp: Tensor, lq: Tensor) -> tuple[Tensor, Tensor]:
    """(φ, ψ = ∂φ/∂l) entrywise at student log-probs ``lp`` and teacher log-probs ``lq``;
    φ is differentiable in ``lp``, ψ is its closed-form derivative."""
    if divergence == "forward_kl":
        q = lq.exp()
        return q * (lq - lp), -q
    p = lp.exp()
    if divergence == "reverse_kl":
        return p * (lp - lq), p * (lp - lq + 1)
    log_m = torch.logaddexp(lq + math.log(beta), lp + math.log1p(-beta))  # log(βq + (1 − β)π)
    q = lq.exp()
    student = (1 - beta) * p * (lp - log_m)
    return beta * q * (lq - log_m) + student, student


@dataclass(frozen=True)
class TeacherTokens:
    """The teacher on the M valid tokens: ``log_probs`` [M, V] (full form) or ``ids`` [M, K]
    with their ``logp`` [M, K] (top-k form)."""

    log_probs: Tensor | None = None
    ids: Tensor | None = None
    logp: Tensor | None = None


class TeacherLogits:
    """The teacher's logits at the M valid tokens, one vocabulary chunk at a time: W'[v0:v1]·h'_t
    (+ b'), or the stored logits' columns. Only the gathered [M, H'] hidden states are kept
    (a teacher given as logits keeps its [M, V] rows: the batch holds them already)."""

    def __init__(self, teacher: Teacher, rows: Tensor, cols: Tensor) -> None:
        self.logits = None if teacher.logits is None else teacher.logits[rows, cols]  # [M, V]
        self.hidden = None if teacher.hidden is None else teacher.hidden[rows, cols]  # [M, H']
        self.weight, self.bias = teacher.weight, teacher.bias
        vocab = teacher.vocab_size
        assert vocab is not None
        self.vocab = vocab

    def chunk(self, start: int, end: int) -> Tensor:
        """[M, end − start] the teacher's logits of vocabulary rows [start, end)."""
        if self.logits is not None:
            return self.logits[:, start:end]
        assert self.hidden is not None and self.weight is not None
        z = self.hidden @ self.weight[start:end].T  # [M, Vc]
        return z if self.bias is None else z + self.bias[start:end]


def teacher_log_probs(teacher: Teacher, rows: Tensor, cols: Tensor, dtype: torch.dtype) -> Tensor:
    """[M, V] log q_t = log_softmax(W' h'_t + b') (or of the stored logits) at the valid tokens,
    in ``dtype``."""
    source = TeacherLogits(teacher, rows, cols)
    return torch.log_softmax(source.chunk(0, source.vocab).to(dtype), dim=-1)


def teacher_tokens(
    teacher: Teacher | None,
    rows: Tensor,
    cols: Tensor,
    d: Distill,
    vocab: int,
    dtype: torch.dtype,
) -> TeacherTokens:
    """The teacher at the valid tokens in the form ``d`` asks for (module docstring)."""
    check_teacher(teacher, d, vocab)
    assert teacher is not None
    if d.form == "full":
        return TeacherTokens(log_probs=teacher_log_probs(teacher, rows, cols, dtype))
    if teacher.has_topk:
        assert teacher.topk_ids is not None and teacher.topk_logp is not None
        return TeacherTokens(
            ids=teacher.topk_ids[rows, cols], logp=teacher.topk_logp[rows, cols].to(dtype)
        )
    logq = teacher_log_probs(teacher, rows, cols, dtype)
    top = torch.topk(logq, d.top_k, dim=-1)
    return TeacherTokens(ids=top.indices, logp=top.values)


def check_teacher(teacher: Teacher | None, d: Distill, vocab: int) -> None:
    """Raise when the batch's teacher cannot give the form ``d`` asks for."""
    if teacher is None or not (teacher.has_full or teacher.has_topk):
        raise GradlensError(
            f"loss.distill needs a teacher, and this batch has none; {NO_TEACHER_HINT}, or unset "
            "loss.distill"
        )
    if d.form == "full" and not teacher.has_full:
        raise GradlensError(
            "loss.distill.form: 'full' needs the teacher's whole distribution (teacher_hidden "
            "and teacher_weight, or teacher_logits); this batch has only stored top-k "
            "log-probs, which give form top_k"
        )
    if teacher.vocab_size is not None and teacher.vocab_size != vocab:
        raise GradlensError(
            f"the teacher's distribution has {teacher.vocab_size} entries and the student's "
            f"lm_head {vocab} rows: distillation needs one vocabulary"
        )
    if d.form == "top_k" and not teacher.has_topk and d.top_k > vocab:
        raise GradlensError(
            f"loss.distill.top_k: {d.top_k} is more than the vocabulary ({vocab}); allowed: "
            f"1 to {vocab}"
        )


def student_at(log_probs: Tensor, teacher: TeacherTokens) -> tuple[Tensor, Tensor]:
    """(lp, lq): the student's log-probs [M, S] on the entries S_t the divergence sums over, and
    the teacher's there (differentiable in ``log_probs`` [M, V])."""
    if teacher.log_probs is not None:
        return log_probs, teacher.log_probs.to(log_probs.dtype)
    assert teacher.ids is not None and teacher.logp is not None
    return log_probs.gather(-1, teacher.ids), teacher.logp.to(log_probs.dtype)


def entry_terms(lp: Tensor, lq: Tensor, d: Distill) -> tuple[Tensor, Tensor]:
    """(φ, u) entrywise: the divergence's terms (differentiable in ``lp``) and u = ψ, 0 where
    verl's clamp holds lp."""
    active = None
    if d.log_prob_min_clamp is not None:
        active = lp >= d.log_prob_min_clamp
        lp = lp.clamp_min(d.log_prob_min_clamp)
        lq = lq.clamp_min(d.log_prob_min_clamp)
    phi, psi = pointwise(effective(d), d.beta, lp, lq)
    if active is not None:
        psi = torch.where(active, psi, 0.0)
    return phi, psi


def token_terms(lp: Tensor, lq: Tensor, d: Distill) -> tuple[Tensor, Tensor]:
    """(D_t [M], u [M, S]) in closed form: the divergence and u = ψ on S_t, 0 where verl's
    clamp holds lp (no graph)."""
    phi, psi = entry_terms(lp, lq, d)
    return phi.sum(-1), psi


def token_value(log_probs: Tensor, teacher: TeacherTokens, d: Distill) -> Tensor:
    """[M] D_t, differentiable in ``log_probs`` [M, V] (autograd's twin of `token_terms`)."""
    lp, lq = student_at(log_probs, teacher)
    if d.log_prob_min_clamp is not None:
        lp = lp.clamp_min(d.log_prob_min_clamp)
        lq = lq.clamp_min(d.log_prob_min_clamp)
    phi, _ = pointwise(effective(d), d.beta, lp, lq)
    return phi.sum(-1)


def dense_grad(probs: Tensor, u: Tensor, teacher: TeacherTokens) -> Tensor:
    """[M, V] ∂D_t/∂z_t = u − π·Σu, ``u`` [M, S] placed on the vocabulary (module docstring)."""
    total = u.sum(-1, keepdim=True)  # [M, 1]
    grad = -probs * total
    if teacher.ids is None:
        return grad + u
    return grad.scatter_add_(-1, teacher.ids, u)


def divergence_grad(
    log_probs: Tensor, teacher: TeacherTokens, d: Distill
) -> tuple[Tensor, Tensor, Tensor]:
    """(D_t [M], ∂D_t/∂z_t [M, V], Σ_v |u_v| [M]) from the student's log π [M, V], no graph;
    the last is the gross size of the cancelling terms (the zero-sum check's scale)."""
    lp, lq = student_at(log_probs, teacher)
    value, u = token_terms(lp, lq, d)
    grad = dense_grad(log_probs.exp(), u, teacher)
    return value, grad, 2 * u.abs().sum(-1)


class StreamedDistill:
    """The distillation term for the streamed engine (a `gradlens.engine.streamed.DenseTerm`):
    nothing of size M×V is kept.

    ``prepare``: the top-k form gathers the student's logits at K_t directly (z_K = W[K_t]·h_t,
    M·K·H) and needs no pass; the full form runs two passes over vocabulary chunks: the
    teacher's logsumexp (one teacher GEMM), then D_t, Σ_v u_tv and Σ_v |u_tv| (one student and
    one teacher GEMM). A top-k form from a teacher pair first finds the pair's top-k chunk by
    chunk. ``block``: λ·a_t·(u − π·Σu) on one chunk (the full form recomputes the teacher's
    chunk: one more teacher GEMM).

    ``weights``: a_t [M], or a function that returns it, called in ``prepare`` (after pass 1's
    coefficients, when the aggregation mask may depend on π_θ).

    Attributes after ``prepare``, [M] each: ``value`` D_t, ``scale`` λ·|a_t|·2Σ_v|u_tv|.
    """

    def __init__(
        self,
        teacher: Teacher | None,
        rows: Tensor,
        cols: Tensor,
        d: Distill,
        hidden: Tensor,
        weight: Tensor,
        weights: Tensor | Callable[[], Tensor],
        chunks: list[tuple[int, int]],
        dtype: torch.dtype,
    ) -> None:
        check_teacher(teacher, d, int(weight.shape[0]))
        assert teacher is not None
        self.d = d
        self.hidden, self.weight = hidden, weight  # [M, H], [V, H]
        self._a = weights  # [M] a_t, or a function giving it when ``prepare`` runs
        self.weights = torch.empty(0)  # [M] λ·a_t after ``prepare``
        self.chunks, self.dtype = chunks, dtype
        self.vocab = int(weight.shape[0])
        self.t_logits = TeacherLogits(teacher, rows, cols) if teacher.has_full else None
        self.ids: Tensor | None = None
        self.logq: Tensor | None = None
        if d.form == "top_k" and teacher.has_topk:
            assert teacher.topk_ids is not None and teacher.topk_logp is not None
            self.ids, self.logq = teacher.topk_ids[rows, cols], teacher.topk_logp[rows, cols]
        self.gemms = 0.0
        self.t_lse = torch.empty(0)
        self.total = torch.empty(0)  # [M] Σ_v u_tv
        self.u_k = torch.empty(0)  # [M, K] u on K_t (top-k form)
        self.value = torch.empty(0)
        self.scale = torch.empty(0)

    def _teacher_logits(self, start: int, end: int) -> Tensor:
        assert self.t_logits is not None
        if self.t_logits.logits is None:
            self.gemms += (end - start) / self.vocab
        return self.t_logits.chunk(start, end).to(self.dtype)  # [M, Vc]

    def _teacher_pass(self) -> None:
        """The teacher's logsumexp, and its top-k when the top-k form comes from the pair."""
        m = self.hidden.shape[0]
        lse = torch.full((m,), -torch.inf, dtype=self.dtype, device=self.hidden.device)
        want_topk = self.d.form == "top_k" and self.ids is None
        best_z = best_ids = None
        for start, end in self.chunks:
            z = self._teacher_logits(start, end)
            lse = torch.logaddexp(lse, torch.logsumexp(z, dim=-1))
            if want_topk:
                ids = torch.arange(start, end, device=z.device).expand_as(z)
                if best_z is not None and best_ids is not None:
                    z, ids = torch.cat([best_z, z], -1), torch.cat([best_ids, ids], -1)
                top = torch.topk(z, min(self.d.top_k, z.shape[-1]), dim=-1)
                best_z, best_ids = top.values, ids.gather(-1, top.indices)
        self.t_lse = lse
        if want_topk and best_z is not None:
            self.ids, self.logq = best_ids, best_z - lse[:, None]

    def prepare(self, lse: Tensor, norm: Normaliser | None = None) -> None:
        """D_t, Σ_v u_tv and the scale; with ``norm``, log π exactly as pass 2 computes it
        (`gradlens.logits.log_probs`), so that the entries verl's clamp keeps are those of
        ``block`` bit for bit and the term sums to zero over the vocabulary."""
        lse = lse.to(self.dtype)
        a = self._a() if callable(self._a) else self._a
        self.weights = self.d.coef * a.to(self.dtype)  # [M] λ·a_t
        if self.t_logits is not None and (self.d.form == "full" or self.ids is None):
            self._teacher_pass()
        if self.d.form == "top_k":
            assert self.ids is not None and self.logq is not None
            w_k = self.weight[self.ids]  # [M, K, H]
            z_k = torch.einsum("mkh,mh->mk", w_k, self.hidden).to(self.dtype)  # [M, K]
            value, self.u_k = token_terms(z_k - lse[:, None], self.logq.to(self.dtype), self.d)
            self.total, gross = self.u_k.sum(-1), self.u_k.abs().sum(-1)
        else:
            m = self.hidden.shape[0]
            value, self.total, gross = (
                torch.zeros(m, dtype=self.dtype, device=self.hidden.device) for _ in range(3)
            )
            for start, end in self.chunks:
                self.gemms += (end - start) / self.vocab
                z = (self.hidden @ self.weight[start:end].T).to(self.dtype)  # [M, Vc]
                lq = self._teacher_logits(start, end) - self.t_lse[:, None]
                lp = z - lse[:, None] if norm is None else log_probs(z, norm, inplace=True)
                part, u = token_terms(lp, lq, self.d)
                value += part
                self.total += u.sum(-1)
                gross += u.abs().sum(-1)
        self.value = value
        self.scale = self.weights.abs() * 2 * gross

    def block(self, start: int, end: int, log_probs: Tensor, probs: Tensor) -> Tensor:
        if self.d.form == "full":
            lq = self._teacher_logits(start, end) - self.t_lse[:, None]
            _, u = token_terms(log_probs, lq, self.d)
        else:
            assert self.ids is not None
            u = torch.zeros_like(probs)
            inside = (self.ids >= start) & (self.ids < end)  # [M, K]
            local = (self.ids - start).clamp(0, end - start - 1)
            u.scatter_add_(-1, local, torch.where(inside, self.u_k, 0.0))
        grad = u.sub_(probs * self.total[:, None])
        return grad.mul_(self.weights[:, None])
