"""Simulation: the vocab-parallel lm_head engine on P CPU ranks (gloo), against docs/scaling.md.

    python benchmarks/sim_vocab_parallel.py            # P = 2, 4, 8: measure, check, plot
    python benchmarks/sim_vocab_parallel.py --table    # the real-shape table of docs/scaling.md

For each world size P it launches P processes (`gradlens.engine.launch.run_ranks`), each holding
rows [v0_r, v1_r) of one seeded W (even split) and the same N tokens, and runs
`vocab_parallel_pass` for k = 3 losses (reinforce, ppo, sft; token_mean; no two share a dense
product) once to warm up, then in three modes:

    streamed   no logits kept between the passes (resident = 0), pass 1 by all_gather
    resident   every chunk's logits kept (resident = V_r / V_c), pass 1 by all_gather
    max_sum    as streamed, pass 1 by all_reduce(MAX) + all_reduce(SUM)

Per rank and mode it records the bytes of every collective (counted by
`gradlens.engine.collectives.Collectives`) and the peak memory of the engine call: the
high-water mark of the resident set (VmHWM, reset through /proc/self/clear_refs) above the level
after the inputs were built, with glibc returning every block over 64 KiB to the OS on free
(MALLOC_MMAP_THRESHOLD_=65536), as benchmarks/bench_lmhead.py measures it. Both are checked
against the formulas of docs/scaling.md (`comm_bytes`, `peak_bytes` below): the bytes exactly,
the memory within ``--memory-tolerance``. Rank 0's row norms are checked against the
single-process engine. Writes a JSON record and a figure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gradlens.containers import TokenInputs
from gradlens.engine.collectives import Collectives
from gradlens.engine.launch import run_ranks
from gradlens.engine.streamed import EnginePlan, lm_head_pass
from gradlens.engine.vocab_parallel import vocab_parallel_pass
from gradlens.engine.vocab_split import even_split
from gradlens.losses import LossParams, aggregation_weights, get_loss

LOSSES = ["reinforce", "ppo", "sft"]
MODES = {  # name: (all chunks resident?, pass-1 combine)
    "streamed": (False, "all_gather"),
    "resident": (True, "all_gather"),
    "max_sum": (False, "max_sum"),
}
MiB = 2**20


# --- the formulas of docs/scaling.md ------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    """N tokens per TP group, vocabulary V, hidden size H, P = TP ranks, k losses (k' of them
    with a dense product of their own), e = 1 with the entropy bonus (k_e losses carry it),
    b bytes of the softmax dtype, b_op of the operands."""

    n: int
    v: int
    h: int
    p: int
    k: int
    k_direct: int | None = None
    e: int = 0
    k_e: int = 0
    b: int = 4
    b_op: int = 4

    @property
    def kd(self) -> int:
        return self.k if self.k_direct is None else self.k_direct

    @property
    def v_r(self) -> float:
        return self.v / self.p


def comm_bytes(s: Shape, step: str) -> float:
    """Bytes one rank sends in ``step`` under the ring algorithms (docs/scaling.md §2)."""
    ring = 2 * (s.p - 1) / s.p  # an all-reduce of n elements sends 2·(P − 1)/P·n of them
    wide = 8  # the float64 sums the zero-sum check reads (S, T, Σπ, ΣE, Σ_v ∂L/∂W_v)
    if step == "pass1":  # all_gather of (m, ζ, α, μ) and the float64 S (and T) per token
        return (s.p - 1) * (4 * s.b + (1 + s.e) * wide) * s.n
    if step == "pass1.max":
        return ring * 3 * s.n * s.b
    if step == "pass1.sum":  # float64: ζ, and S (and T) split in two on a grid
        return ring * (3 + 2 * s.e) * s.n * wide
    if step == "finish.sum":  # norms [k, V], H, (k_e·other mass), count
        return ring * (s.k * s.v + (1 + s.k_e) * s.n + 1) * s.b
    if step == "finish.gather":  # float64 row sums [k, H], Σπ (and ΣE), added in rank order
        return (s.p - 1) * (s.k * s.h + (1 + s.e) * s.n) * wide
    if step == "finish.max":
        return ring * s.k_e * s.n * s.b
    raise KeyError(step)


def peak_bytes(s: Shape, chunk: int, resident: int) -> float:
    """Peak working memory of one rank's engine call above its inputs (docs/scaling.md §3):
    the largest of the live sets at pass 1's last chunk, at pass 2's start (c⊙h built) and at
    pass 2's first chunk, plus the per-token statistics and the [k, V] row norms."""
    nvc = s.n * chunk * s.b  # one [N, V_c] buffer
    scaled = s.kd * s.n * s.h * s.b  # c⊙h for the k' losses with their own dense product
    bf16 = s.b_op < s.b
    h_copies = s.n * s.h * (s.b + s.b_op) if bf16 else 0  # h in the softmax and GEMM dtypes
    cast = (s.kd * s.n * s.h + s.n * chunk) * s.b_op if bf16 else 0  # c⊙h and π in bf16
    # the [V_c, k'·H] product and its negation (and the product's bf16 original)
    dense = chunk * s.kd * s.h * (2 * s.b + (s.b_op if bf16 else 0))
    work = 3 + s.e  # [N, V_c] buffers of a chunk (planner's ``buffers``)
    pass1 = resident * nvc + 2 * nvc + (s.n * chunk * s.b_op if bf16 else 0)
    pass2_start = resident * nvc + scaled + h_copies
    pass2_chunk = (
        max(resident - 1, 0) * nvc + scaled + h_copies + cast + max(work * nvc, nvc + dense)
    )
    # gathered (4 numbers and the float64 S, T per rank), own, and c_k
    stats = (s.p * (4 * s.b + 8 * (1 + s.e)) + (5 + 2 * s.k) * s.b) * s.n
    norms = 2 * s.k * s.v * s.b  # the [k, V] finishing buffer and its reduced copy
    return max(pass1, pass2_start, pass2_chunk) + stats + norms


def gemm_flop(s: Shape, resident_fraction: float) -> float:
    """FLOP per rank: 1 + (1 − f) + k' GEMMs of 2·N·H·V_r (+ 1 with the bonus)."""
    return (2 - resident_fraction + s.kd + s.e) * 2 * s.n * s.h * s.v_r


# --- the ranks ----------------------------------------------------------------------------------


def _status(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def _baseline() -> int:
    with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
        fh.write("5")
    return _status("VmRSS")


def coefficient_fn(advantages: torch.Tensor, old_logp: torch.Tensor):
    """logp [N] → c_k [N] of each loss, as one sequence of N tokens with token_mean."""
    params = LossParams()

    def fn(logp: torch.Tensor) -> list[torch.Tensor]:
        mask = torch.ones(1, logp.numel(), dtype=torch.bool)
        inp = TokenInputs(logp[None], old_logp[None].to(logp.dtype), advantages[None], mask)
        w = aggregation_weights(mask, "token_mean", None, logp.dtype)
        return [(w * get_loss(n).fn(inp, params).per_token_grad)[0] for n in LOSSES]

    return fn


@dataclass(frozen=True)
class SimConfig:
    """One simulated shape: N tokens, H, V, the chunk V_c, the operand dtype, the modes."""

    name: str
    n: int
    h: int
    v: int
    chunk: int
    dtype: str
    modes: tuple[str, ...]


CONFIGS = [
    # small H: the [N, V_c] buffers and the resident logits dominate
    SimConfig("narrow", 4096, 64, 32768, 1024, "float32", ("streamed", "resident", "max_sum")),
    # large H, bf16 operands: the N·H terms (h in fp32 and bf16, c⊙h and its bf16 copy) dominate,
    # as they do for the real shapes of the table
    SimConfig("wide", 2048, 1024, 4096, 256, "bfloat16", ("streamed",)),
]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def sim_rank(rank: int, world: int, path: str, cfg: SimConfig) -> dict[str, Any]:
    data = torch.load(path, mmap=True)
    split = even_split(data["weight"].shape[0], world)
    weight = split.weight_shard(data["weight"], rank).clone()  # [V_r, H]
    hidden, tokens = data["hidden"].clone(), data["tokens"].clone()
    coefficients = coefficient_fn(data["advantages"].clone(), data["old_logp"].clone())
    del data
    out: dict[str, Any] = {"rank": rank, "modes": {}}
    # warm-up: the first call also maps the kernels' code and the backend's buffers into memory
    vocab_parallel_pass(hidden, weight, tokens, coefficients, EnginePlan(cfg.chunk, 0), split)
    for mode in cfg.modes:
        resident, pass1 = MODES[mode]
        plan = EnginePlan(cfg.chunk, -(-weight.shape[0] // cfg.chunk) if resident else 0)
        comm = Collectives()
        base = _baseline()
        res = vocab_parallel_pass(
            hidden, weight, tokens, coefficients, plan, split, comm, pass1=pass1
        )
        peak = _status("VmHWM") - base
        out["modes"][mode] = {
            "peak_bytes": peak,
            "resident_chunks": plan.resident,
            "log": [vars(r) for r in comm.log],
            "gemm_equivalents": res.gemm_equivalents,
        }
        if rank == 0 and mode == "streamed":
            out["norms"] = torch.stack([r.norms for r in res.rows])
            out["logp"] = res.tokens.logp
        del res
    return out


def make_inputs(cfg: SimConfig, path: str) -> dict[str, torch.Tensor]:
    """Seeded h, W (peaked, as an LM head is), y ~ π_θ, A and ℓ_old = ℓ + 0.1·ε."""
    gen = torch.Generator().manual_seed(0)
    n, h, v = cfg.n, cfg.h, cfg.v
    hidden = torch.randn(n, h, generator=gen)
    weight = torch.randn(v, h, generator=gen) * (4.0 / h**0.5)
    tokens = torch.empty(n, dtype=torch.long)
    logp = torch.empty(n)
    for s in range(0, n, 256):
        z = hidden[s : s + 256] @ weight.T
        y = torch.multinomial(torch.softmax(z, -1), 1, generator=gen).squeeze(-1)
        tokens[s : s + 256] = y
        logp[s : s + 256] = torch.log_softmax(z, -1).gather(-1, y[:, None]).squeeze(-1)
    dt = DTYPES[cfg.dtype]
    data = {
        "hidden": hidden.to(dt),
        "weight": weight.to(dt),
        "tokens": tokens,
        "advantages": torch.randn(n, generator=gen),
        "old_logp": logp + 0.1 * torch.randn(n, generator=gen),
    }
    torch.save(data, path)
    return data


# --- the run ------------------------------------------------------------------------------------

# rank 0's row norms against the single-process engine, normwise: float32 differs only in the
# order of the sums (~|z|·2⁻²⁴ on the logits); bf16 operands round π to bf16 before the dense
# GEMM, where a last-ulp difference of lse can flip an entry's rounding: 2·2⁻⁸
NORMS_TOL = {"float32": 1e-5, "bfloat16": 1e-2}


def simulate(args: argparse.Namespace) -> dict[str, Any]:
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"  # inherited by the spawned ranks
    folder = tempfile.mkdtemp(prefix="gradlens-sim-")
    runs: list[dict[str, Any]] = []
    failures: list[str] = []
    for cfg in CONFIGS:
        if args.configs and cfg.name not in args.configs:
            continue
        path = str(Path(folder) / f"{cfg.name}.pt")
        data = make_inputs(cfg, path)
        ref = lm_head_pass(
            data["hidden"],
            data["weight"],
            data["tokens"],
            coefficient_fn(data["advantages"], data["old_logp"]),
            EnginePlan(cfg.chunk, 0),
        )
        ref_norms = torch.stack([r.norms for r in ref.rows])
        del data
        b_op = DTYPES[cfg.dtype].itemsize
        for p in args.worlds:
            ranks = run_ranks(sim_rank, p, (path, cfg), timeout_s=1800, threads=1)
            err = float((ranks[0]["norms"] - ref_norms).abs().max() / ref_norms.abs().max())
            if err > NORMS_TOL[cfg.dtype]:
                failures.append(f"{cfg.name} P={p}: rank 0's row norms {err:.2g} off")
            shape = Shape(n=cfg.n, v=cfg.v, h=cfg.h, p=p, k=len(LOSSES), b=4, b_op=b_op)
            for mode in cfg.modes:
                runs.append(_check(cfg, p, mode, ranks, shape, args, failures))
                runs[-1]["norms_rel_err_vs_single_process"] = err
    return {
        "machine": platform.platform(),
        "torch": torch.__version__,
        "threads_per_rank": 1,
        "losses": LOSSES,
        "configs": [vars(c) for c in CONFIGS if not args.configs or c.name in args.configs],
        "memory_tolerance": args.memory_tolerance,
        "runs": runs,
        "failures": failures,
    }


def _check(
    cfg: SimConfig,
    p: int,
    mode: str,
    ranks: list[dict[str, Any]],
    shape: Shape,
    args: argparse.Namespace,
    failures: list[str],
) -> dict[str, Any]:
    """One mode of one world size: every rank's bytes against the formulas (exactly) and peak
    memory (within the tolerance)."""
    label = f"{cfg.name} P={p} {mode}"
    peaks = [r["modes"][mode]["peak_bytes"] for r in ranks]
    resident = ranks[0]["modes"][mode]["resident_chunks"]
    model = peak_bytes(shape, cfg.chunk, resident)
    sent_per_rank = []
    for r in ranks:
        sent: dict[str, float] = {}
        for rec in r["modes"][mode]["log"]:
            sent[rec["step"]] = sent.get(rec["step"], 0.0) + rec["ring_bytes"]
        sent_per_rank.append(sent)
    formula = {step: comm_bytes(shape, step) for step in sent_per_rank[0]}
    for rank, sent in enumerate(sent_per_rank):
        for step, got in sent.items():
            if abs(got - formula[step]) > 1e-9 * formula[step]:
                failures.append(f"{label} rank {rank} {step}: {got} bytes, formula {formula[step]}")
    worst = max(peaks, key=lambda x: abs(x - model))
    if abs(worst - model) > args.memory_tolerance * model:
        failures.append(f"{label}: peak {worst / MiB:.1f} MiB, formula {model / MiB:.1f} MiB")
    return {
        "config": cfg.name,
        "P": p,
        "mode": mode,
        "resident_chunks": resident,
        "peak_bytes": peaks,
        "peak_formula_bytes": model,
        "sent_bytes": sent_per_rank[0],
        "sent_formula_bytes": formula,
        "gemm_equivalents": ranks[0]["modes"][mode]["gemm_equivalents"],
    }


def plot(record: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    runs = record["runs"]
    configs = {c["name"]: c for c in record["configs"]}

    def ticks(ax, values, label="TP ranks P"):
        ax.set_xscale("log", base=2)
        ax.set_xticks(values, [str(v) for v in values])
        ax.set_xlabel(label)

    ax = axes[0]
    for cfg, mode, colour in (
        ("narrow", "resident", "tab:blue"),
        ("narrow", "streamed", "tab:orange"),
        ("wide", "streamed", "tab:green"),
    ):
        sel = [r for r in runs if r["config"] == cfg and r["mode"] == mode]
        if not sel:
            continue
        c = configs[cfg]
        worlds = [r["P"] for r in sel]
        for r in sel:
            mib = [b / MiB for b in r["peak_bytes"]]
            ax.scatter([r["P"]] * len(mib), mib, color=colour, s=16, zorder=3)
        ax.plot(
            worlds,
            [r["peak_formula_bytes"] / MiB for r in sel],
            color=colour,
            label=f"{mode}: N={c['n']}, H={c['h']}, V={c['v']}, V_c={c['chunk']}, {c['dtype']}",
        )
        ticks(ax, worlds)
    ax.set_ylabel("peak memory per rank above its inputs (MiB)")
    ax.set_title("memory: every rank measured (dots) vs formula (lines)")
    ax.legend(fontsize=7)

    ax = axes[1]
    sel = {m: [r for r in runs if r["config"] == "narrow" and r["mode"] == m] for m in MODES}
    if not all(sel.values()):
        raise SystemExit("the figure needs the narrow configuration's three modes")
    worlds = [r["P"] for r in sel["streamed"]]
    series = [
        ("pass 1, all_gather", "tab:blue", "streamed", ("pass1",)),
        ("pass 1, all_reduce max + sum", "tab:red", "max_sum", ("pass1.max", "pass1.sum")),
        (
            "finish, all_reduce sum + all_gather",
            "tab:green",
            "streamed",
            ("finish.sum", "finish.gather"),
        ),
    ]
    for label, colour, mode, steps in series:
        got = [sum(r["sent_bytes"][st] for st in steps) / 1024 for r in sel[mode]]
        want = [sum(r["sent_formula_bytes"][st] for st in steps) / 1024 for r in sel[mode]]
        ax.plot(worlds, want, color=colour, label=label)
        ax.scatter(worlds, got, color=colour, s=16, zorder=3)
    ticks(ax, worlds)
    c = configs["narrow"]
    ax.set_ylabel("KiB sent per rank (ring algorithms)")
    ax.set_title(f"communication, N={c['n']}, V={c['v']}, k=3: counted (dots) vs formula")
    ax.legend(fontsize=8)

    ax = axes[2]
    ns = [2**e for e in range(13, 21)]
    for name, v, h, colour in MODELS:
        mem = [real_memory(v, h, n, 8, dp=1)["total"] / 1e9 for n in ns]
        ax.plot(ns, mem, color=colour, label=f"{name} (V={v:,}, H={h:,})")
    for cap in (80, 141):
        ax.axhline(cap, color="grey", lw=0.8)
        ax.text(ns[0], cap * 1.07, f"{cap} GB", color="grey", fontsize=8)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(ns, [_tokens(n) for n in ns])
    ax.set_xlabel("tokens per TP group N = T / DP")
    ax.set_ylabel("GB per rank (formula)")
    ax.set_title(f"extrapolated: TP = 8, bf16, k = {K_TABLE}, V_c = {CHUNK_TABLE}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# --- the real-shape table -----------------------------------------------------------------------

MODELS = [
    ("Qwen3-235B", 151_936, 4_096, "tab:blue"),
    ("DeepSeek-V3", 129_280, 7_168, "tab:orange"),
    ("Llama-3-405B", 128_256, 16_384, "tab:green"),
]
K_TABLE = 4  # reinforce, ppo, ppo_clip, sft: the default config's losses
CHUNK_TABLE = 256  # the planner's smallest vocabulary chunk: the least working memory


def _tokens(t: int) -> str:
    return f"{t // 2**20}M" if t >= 2**20 else f"{t // 1024}k"


def real_memory(v: int, h: int, t: int, tp: int, dp: int) -> dict[str, float]:
    """Per-rank bytes for bf16 operands and fp32 softmax, N = T / DP tokens per TP group."""
    n = t // dp
    s = Shape(n=n, v=v, h=h, p=tp, k=K_TABLE, b=4, b_op=2)
    inputs = (v / tp) * h * 2 + n * h * 2 + 8 * n
    work = peak_bytes(s, min(CHUNK_TABLE, int(s.v_r)), 0)
    return {"inputs": inputs, "work": work, "total": inputs + work}


def table() -> str:
    """TP = 8, DP = 1 (N = T): bytes sent per rank per phase, per-rank memory, GEMM FLOP per
    rank, and the smallest power-of-two DP (N = T / DP) that fits the total in 80 GB."""
    rows = [
        "| model | T | pass 1 all_gather | pass 1 max+sum | finish | W_r + h | engine work "
        "| total / rank | GEMM FLOP / rank | DP for 80 GB |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    tp = 8
    for name, v, h, _ in MODELS:
        for t in (65536, 2**20):
            s = Shape(n=t, v=v, h=h, p=tp, k=K_TABLE, b=4, b_op=2)
            mem = real_memory(v, h, t, tp, 1)
            p1 = comm_bytes(s, "pass1")
            p1ms = comm_bytes(s, "pass1.max") + comm_bytes(s, "pass1.sum")
            fin = comm_bytes(s, "finish.sum") + comm_bytes(s, "finish.gather")
            dp = 1
            while real_memory(v, h, t, tp, dp)["total"] > 80e9:
                dp *= 2
            rows.append(
                f"| {name} | {_tokens(t)} | {_size(p1)} | {_size(p1ms)} "
                f"| {_size(fin)} | {_size(mem['inputs'])} | {_size(mem['work'])} "
                f"| {_size(mem['total'])} | {gemm_flop(s, 0.0):.2g} | {dp} |"
            )
    return "\n".join(rows)


def _size(b: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if b >= scale:
            return f"{b / scale:.3g} {unit}"
    return f"{b:.0f} B"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--configs", default=None, help="comma-separated: narrow, wide (all)")
    p.add_argument("--worlds", default="2,4,8")
    p.add_argument("--memory-tolerance", type=float, default=0.15)
    p.add_argument("--json", default="benchmarks/results/sim_vocab_parallel.json")
    p.add_argument("--figure", default="docs/figures/vocab_parallel_sim.png")
    p.add_argument("--table", action="store_true", help="print the real-shape table and exit")
    args = p.parse_args()
    if args.table:
        print(table())
        return
    args.worlds = [int(w) for w in args.worlds.split(",")]
    args.configs = args.configs.split(",") if args.configs else None
    record = simulate(args)
    Path(args.json).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    plot(record, args.figure)
    for r in record["runs"]:
        print(
            f"{r['config']:6s} P={r['P']} {r['mode']:9s} peak/rank "
            f"{min(r['peak_bytes']) / MiB:7.1f}–{max(r['peak_bytes']) / MiB:7.1f} MiB "
            f"(formula {r['peak_formula_bytes'] / MiB:7.1f}); sent "
            + ", ".join(f"{k} {b / 1024:.1f} KiB" for k, b in r["sent_bytes"].items())
        )
    if record["failures"]:
        print("FAILED:\n  " + "\n  ".join(record["failures"]))
        sys.exit(1)
    print(
        "every rank's bytes equal the formulas; every peak is within "
        f"{args.memory_tolerance:.0%} of its formula"
    )


if __name__ == "__main__":
    main()
