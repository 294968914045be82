"""Benchmark: the streamed lm_head engine against naive autograd and the GEMM floor, one run.

    python benchmarks/bench_lmhead.py                       # CPU: T=2048, H=512, V=32000
    python benchmarks/bench_lmhead.py --device cuda --dtype bfloat16 --budget-mib 1024 \
        --tokens 8192,65536 --hidden 4096 --vocab 151936 \
        --results-dir benchmarks/results                    # the GPU anchors of performance.md
    python benchmarks/bench_lmhead.py --attribution --methods gemm,engine   # its cost

Each method runs in its own child process, so that peak memory is measured per method:
the high-water mark of the resident set (VmHWM, reset
through /proc/self/clear_refs) on CPU, ``torch.cuda.max_memory_allocated`` on CUDA, both
minus the level reached after the inputs were built. Times are medians over ``--repeats``
runs after one warm-up (which also compiles the fused engine's Triton kernels). Printed and
written as JSON (``--json`` for one T, or one file per T under ``--results-dir``, named after
the device), one summary per T:

- ``gemm``: one logits GEMM h·Wᵀ (2·T·H·V FLOP); the floor for k losses is (1 + k) of them;
- ``naive``: per loss, fp32 logits → log_softmax → gather → the loss → backward →
  ``W.grad.norm(dim=1)``, as a hand-written diagnostic would do it; times summed over losses;
- ``engine``: `gradlens.engine.streamed.lm_head_pass` for all losses together;
- ``fused``: `gradlens.engine.fused.fused_lm_head_pass`, the same with Triton kernels between
  the GEMMs (CUDA only; in the default methods on CUDA);
- ``attribution`` (``--attribution`` adds it): the engine with the attribution sums of every
  loss (`gradlens.engine.attribution`, ``diagnostics.attribution: on``), the T tokens cut into
  sequences of ``--seq-len``; ``attribution_vs_engine`` and ``attribution_gemm_ratio`` are its
  time and its GEMM-equivalents as ratios against the engine without it.

Row norms of the engines are compared with the naive ones and with each other (normwise:
max |a − b| / max |b|). A method that runs out of memory is recorded as such, not timed.
``fused_vs_engine`` and ``fused_equal_within_tolerance`` are the two facts on which the fused
engine may be chosen automatically on CUDA (`gradlens.engine.fused`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Any

import torch

from gradlens.containers import TokenInputs
from gradlens.diagnostics import tolerances
from gradlens.engine.attribution import AttributionPlan, sequence_layout
from gradlens.engine.fused import fused_lm_head_pass
from gradlens.engine.streamed import lm_head_pass, plan
from gradlens.grads import token_inputs  # noqa: F401  (documented companion of the engine)
from gradlens.logits import softmax_dtype
from gradlens.losses import LossParams, aggregation_weights, get_loss

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--tokens", default="2048", help="T, valid tokens (a comma list: one run each)")
    p.add_argument("--hidden", type=int, default=512, help="H")
    p.add_argument("--vocab", type=int, default=32000, help="V")
    p.add_argument("--losses", default="reinforce,ppo,ppo_clip")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--budget-mib",
        type=float,
        default=None,
        help="engine working-memory budget (default: 1/8 of the naive T·V·12 bytes)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--methods", default=None, help="default: gemm,naive,engine (+ fused on CUDA)")
    p.add_argument(
        "--attribution",
        action="store_true",
        help="also run the engine with the attribution sums (the method `attribution`)",
    )
    p.add_argument(
        "--seq-len", type=int, default=256, help="tokens per sequence for the attribution"
    )
    p.add_argument("--json", default=None, help="write the results here (one T only)")
    p.add_argument(
        "--results-dir", default=None, help="write one JSON per T here, named after the device"
    )
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return p.parse_args()


def inputs(args: argparse.Namespace, t: int) -> dict[str, torch.Tensor]:
    """Seeded h, W, tokens, advantages and old log-probs (ratio noise σ = 0.1), drawn on the
    device from a generator of that device (the CPU draws are those of earlier runs)."""
    dev, dt = torch.device(args.device), DTYPES[args.dtype]
    gen = torch.Generator(device=dev).manual_seed(0)
    h, v = args.hidden, args.vocab
    hidden = torch.randn(t, h, generator=gen, device=dev)
    weight = torch.randn(v, h, generator=gen, device=dev) * (4.0 / h**0.5)  # peaked, as an LM head
    tokens = torch.empty(t, dtype=torch.long, device=dev)
    logp = torch.empty(t, device=dev)
    for s in range(0, t, 256):  # sample y ~ π_θ in token chunks (setup, not timed)
        z = hidden[s : s + 256] @ weight.T
        tokens[s : s + 256] = torch.multinomial(torch.softmax(z, -1), 1, generator=gen).squeeze(-1)
        logp[s : s + 256] = (
            torch.log_softmax(z, -1).gather(-1, tokens[s : s + 256, None]).squeeze(-1)
        )
    return {
        "hidden": hidden.to(dt),
        "weight": weight.to(dt),
        "tokens": tokens,
        "advantages": torch.randn(t, generator=gen, device=dev),
        "old_logp": logp + 0.1 * torch.randn(t, generator=gen, device=dev),
    }


def coefficient_fn(names: list[str], data: dict[str, torch.Tensor]):
    """logp [T] → c_k [T] for each loss, as one sequence of T tokens with token_mean."""
    params = LossParams()

    def fn(logp: torch.Tensor) -> list[torch.Tensor]:
        mask = torch.ones(1, logp.numel(), dtype=torch.bool, device=logp.device)
        inp = TokenInputs(
            logp=logp[None],
            old_logp=data["old_logp"][None].to(logp.dtype),
            advantages=data["advantages"][None].to(logp.dtype),
            mask=mask,
        )
        w = aggregation_weights(mask, "token_mean", None, logp.dtype)
        return [(w * get_loss(n).fn(inp, params).per_token_grad)[0] for n in names]

    return fn


def naive(names: list[str], data: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """Per loss: fp32 logits, log_softmax, gather, the loss, backward, .grad row norms."""
    out = []
    params = LossParams()
    mask = torch.ones(1, data["tokens"].numel(), dtype=torch.bool, device=data["tokens"].device)
    for name in names:
        weight = data["weight"].detach().clone().requires_grad_(True)
        logits = (data["hidden"] @ weight.T).float()
        logp = torch.log_softmax(logits, -1).gather(-1, data["tokens"][:, None]).squeeze(-1)
        inp = TokenInputs(logp[None], data["old_logp"][None], data["advantages"][None], mask)
        w = aggregation_weights(mask, "token_mean", None, logp.dtype)
        (w * get_loss(name).fn(inp, params).per_token).sum().backward()
        assert weight.grad is not None
        out.append(weight.grad.float().norm(dim=1))
        del logits, logp, weight
    return out


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _status(field: str) -> int:
    """A ``/proc/self/status`` memory field in bytes (Linux)."""
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def memory_baseline(device: str) -> int:
    """Reset the peak counter and return the current level it is measured against.

    CPU: the resident set now (VmRSS), after resetting the high-water mark VmHWM by writing
    5 to /proc/self/clear_refs, so that peaks of the input set-up do not count.
    """
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
        fh.write("5")
    return _status("VmRSS")


def memory_peak(device: str) -> int:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated()
    return _status("VmHWM")


def child(args: argparse.Namespace) -> dict[str, Any]:
    """Time one method in this process and report its time, peak memory and row norms."""
    if args.threads:
        torch.set_num_threads(args.threads)
    names = args.losses.split(",")
    t = int(args.tokens)
    data = inputs(args, t)
    h, v, k = args.hidden, args.vocab, len(names)
    budget = int((args.budget_mib or t * v * 12 / 8 / 2**20) * 2**20)
    attribution = None
    if args.child == "attribution":  # as compare plans it: 4 more [M, Vc] buffers
        engine_plan = plan(t, v, h, k, budget, buffers=7)
        sequence = torch.arange(t, device=data["hidden"].device) // args.seq_len
        acc = softmax_dtype(data["weight"].dtype)
        layout = sequence_layout(sequence, -(-t // args.seq_len), data["hidden"].to(acc))
        attribution = AttributionPlan(k, layout)
    else:
        engine_plan = plan(t, v, h, k, budget)
    engines = {"engine": lm_head_pass, "fused": fused_lm_head_pass, "attribution": lm_head_pass}

    def run() -> Any:
        if args.child == "gemm":
            return data["hidden"] @ data["weight"].T
        if args.child == "naive":
            return naive(names, data)
        extra = {} if attribution is None else {"attribution": attribution}
        return engines[args.child](
            data["hidden"],
            data["weight"],
            data["tokens"],
            coefficient_fn(names, data),
            engine_plan,
            **extra,
        )

    sync(args.device)
    base = memory_baseline(args.device)
    times = []
    try:
        result = run()  # warm-up
        sync(args.device)
        for _ in range(args.repeats):
            start = time.perf_counter()
            result = run()
            sync(args.device)
            times.append(time.perf_counter() - start)
    except (torch.OutOfMemoryError, MemoryError) as exc:
        return {"method": args.child, "error": f"out of memory: {str(exc)[:200]}"}
    peak = memory_peak(args.device) - base
    out: dict[str, Any] = {
        "method": args.child,
        "seconds": statistics.median(times),
        "peak_extra_bytes": peak,
        "times": times,
    }
    if args.child == "naive":
        out["norms"] = [n.double().cpu().tolist() for n in result]
    if args.child in engines:
        out["norms"] = [r.norms.double().cpu().tolist() for r in result.rows]
        out["gemm_equivalents"] = result.gemm_equivalents
        out["plan"] = {
            "vocab_chunk": engine_plan.vocab_chunk,
            "resident_chunks": engine_plan.resident,
        }
    return out


def _run(cmd: list[str], env: Any, method: str) -> dict[str, Any]:
    """A child's result, or its failure (a crash, the OS's out-of-memory killer) as an error."""
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or [""])[-1]
        return {"method": method, "error": f"exit {proc.returncode}: {last[-300:]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def normwise(a: list[list[float]], b: list[list[float]]) -> float:
    """max over losses of max_v |a_v − b_v| / max_v |b_v|."""
    errs = []
    for x, y in zip(a, b, strict=True):
        ta, tb = torch.tensor(x), torch.tensor(y)
        errs.append(float((ta - tb).abs().max() / tb.abs().max()))
    return max(errs)


def device_name(device: str) -> str:
    return device if device == "cpu" else torch.cuda.get_device_name(0)


def summarize(args: argparse.Namespace, t: int, results: dict[str, Any]) -> dict[str, Any]:
    """Times and peak memory, as ratios to the GEMM floor and to naive autograd."""
    k = len(args.losses.split(","))
    summary: dict[str, Any] = {
        "device": device_name(args.device),
        "machine": platform.platform(),
        "processor": platform.processor(),
        "torch": torch.__version__,
        "threads": args.threads or torch.get_num_threads(),
        "dtype": args.dtype,
        "T": t,
        "H": args.hidden,
        "V": args.vocab,
        "losses": args.losses.split(","),
    }
    if args.budget_mib:
        summary["budget_mib"] = args.budget_mib
    if args.attribution:
        summary["seq_len"] = args.seq_len
    ok = {m: r for m, r in results.items() if "error" not in r}
    for m, r in results.items():
        if "error" in r:
            summary[f"{m}_error"] = r["error"]
    gemm = ok.get("gemm", {}).get("seconds")
    if gemm:
        summary["gemm_seconds"] = gemm
        summary["gemm_tflops"] = 2 * t * args.hidden * args.vocab / gemm / 1e12
        summary["floor_seconds"] = (1 + k) * gemm
    for name in ("naive", "engine", "fused", "attribution"):
        if name in ok:
            summary[f"{name}_seconds"] = ok[name]["seconds"]
            summary[f"{name}_peak_extra_gib"] = ok[name]["peak_extra_bytes"] / 2**30
    for name in ("engine", "fused", "attribution"):
        if name not in ok:
            continue
        summary[f"{name}_gemm_equivalents"] = ok[name]["gemm_equivalents"]
        summary[f"{name}_plan"] = ok[name]["plan"]
        if gemm:
            summary[f"{name}_vs_floor"] = ok[name]["seconds"] / summary["floor_seconds"]
        if "naive" in ok and name != "attribution":
            prefix = "" if name == "engine" else "fused_"  # the engine's keys as before
            naive_run = ok["naive"]
            summary[f"{prefix}speedup_vs_naive"] = naive_run["seconds"] / ok[name]["seconds"]
            summary[f"{prefix}memory_vs_naive"] = ok[name]["peak_extra_bytes"] / max(
                naive_run["peak_extra_bytes"], 1
            )
            summary[f"{prefix}row_norm_rel_err_vs_naive"] = normwise(
                ok[name]["norms"], naive_run["norms"]
            )
    if "engine" in ok and "attribution" in ok:
        engine_run, with_sums = ok["engine"], ok["attribution"]
        summary["attribution_vs_engine"] = with_sums["seconds"] / engine_run["seconds"]
        summary["attribution_gemm_ratio"] = (
            with_sums["gemm_equivalents"] / engine_run["gemm_equivalents"]
        )
        summary["attribution_row_norm_rel_err_vs_engine"] = normwise(
            with_sums["norms"], engine_run["norms"]
        )
    if "engine" in ok and "fused" in ok:
        summary["fused_vs_engine"] = ok["fused"]["seconds"] / ok["engine"]["seconds"]
        err = normwise(ok["fused"]["norms"], ok["engine"]["norms"])
        summary["fused_row_norm_rel_err_vs_engine"] = err
        # the agreement tolerance of the operand dtype (gradlens/diagnostics/tolerances.py)
        summary["fused_tolerance"] = tolerances.agreement(DTYPES[args.dtype])
        summary["fused_equal_within_tolerance"] = err <= summary["fused_tolerance"]
    return summary


def main() -> None:
    args = parse()
    if args.child:
        print(json.dumps(child(args)))
        return
    token_counts = [int(x) for x in args.tokens.split(",")]
    if args.json and len(token_counts) > 1:
        sys.exit("--json takes one T; use --results-dir for several")
    methods = args.methods or ("gemm,naive,engine,fused" if args.device == "cuda" else
                               "gemm,naive,engine")  # fmt: skip
    if args.attribution and "attribution" not in methods.split(","):
        methods += ",attribution"
    for t in token_counts:
        results = {}
        for method in methods.split(","):
            cmd = [sys.executable, __file__, "--child", method, "--tokens", str(t)]
            for key, value in vars(args).items():
                skip = ("child", "json", "results_dir", "tokens", "methods", "attribution")
                if key not in skip and value is not None:
                    cmd += [f"--{key.replace('_', '-')}", str(value)]
            timed = _run(cmd, os.environ, method)
            if args.device == "cpu" and "error" not in timed:
                # Memory in a second child where large blocks always come from mmap and go back
                # to the OS when freed, so that the resident set follows the live tensors
                # (glibc's dynamic threshold keeps freed set-up buffers resident and hides the
                # method's own peak). Page faults slow that child down: its times are not used.
                env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
                measured = _run(cmd, env, method)
                if "error" not in measured:
                    timed["peak_extra_bytes"] = measured["peak_extra_bytes"]
            results[method] = timed
        summary = summarize(args, t, results)
        for key, value in summary.items():
            print(f"{key:34s} {value:.4g}" if isinstance(value, float) else f"{key:34s} {value}")
        print()
        path = args.json
        if args.results_dir:
            slug = "-".join(device_name(args.device).lower().split())
            name = f"{slug}_{args.dtype}_T{t}_H{args.hidden}_V{args.vocab}.json"
            path = os.path.join(args.results_dir, name)
        if path:
            runs = {
                m: {k2: v2 for k2, v2 in r.items() if k2 != "norms"} for m, r in results.items()
            }
            with open(path, "w", encoding="utf-8") as fh:
                json.dump({"summary": summary, "runs": runs}, fh, indent=2)


if __name__ == "__main__":
    main()
