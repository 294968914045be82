"""Benchmark: the streamed lm_head engine against naive autograd and the GEMM floor, one run.

    python benchmarks/bench_lmhead.py                       # CPU: T=2048, H=512, V=32000
    python benchmarks/bench_lmhead.py --device cuda --dtype bfloat16 \
        --tokens 8192 --hidden 4096 --vocab 151936          # the GPU anchor of performance.md

Each method runs in its own child process, so that peak memory is measured per method:
the high-water mark of the resident set (VmHWM, reset
through /proc/self/clear_refs) on CPU, ``torch.cuda.max_memory_allocated`` on CUDA, both
minus the level reached after the inputs were built. Times are medians over ``--repeats``
runs after one warm-up. Printed and written as JSON (``--json``):

- ``gemm``: one logits GEMM h·Wᵀ (2·T·H·V FLOP); the floor for k losses is (1 + k) of them;
- ``naive``: per loss, fp32 logits → log_softmax → gather → the loss → backward →
  ``W.grad.norm(dim=1)``, as a hand-written diagnostic would do it; times summed over losses;
- ``engine``: `gradlens.engine.streamed.lm_head_pass` for all losses together.

Row norms of the engine are compared with the naive ones (normwise: max |a − b| / max |b|).
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
from gradlens.engine.streamed import lm_head_pass, plan
from gradlens.grads import token_inputs  # noqa: F401  (documented companion of the engine)
from gradlens.losses import LossParams, aggregation_weights, get_loss

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--tokens", type=int, default=2048, help="T, valid tokens")
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
    p.add_argument("--methods", default="gemm,naive,engine")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return p.parse_args()


def inputs(args: argparse.Namespace) -> dict[str, torch.Tensor]:
    """Seeded h, W, tokens, advantages and old log-probs (ratio noise σ = 0.1)."""
    gen = torch.Generator().manual_seed(0)
    t, h, v = args.tokens, args.hidden, args.vocab
    hidden = torch.randn(t, h, generator=gen)
    weight = torch.randn(v, h, generator=gen) * (4.0 / h**0.5)  # peaked, as an LM head is
    tokens = torch.empty(t, dtype=torch.long)
    logp = torch.empty(t)
    for s in range(0, t, 256):  # sample y ~ π_θ in token chunks (setup, not timed)
        z = hidden[s : s + 256] @ weight.T
        tokens[s : s + 256] = torch.multinomial(torch.softmax(z, -1), 1, generator=gen).squeeze(-1)
        logp[s : s + 256] = (
            torch.log_softmax(z, -1).gather(-1, tokens[s : s + 256, None]).squeeze(-1)
        )
    dev, dt = torch.device(args.device), DTYPES[args.dtype]
    return {
        "hidden": hidden.to(dev, dt),
        "weight": weight.to(dev, dt),
        "tokens": tokens.to(dev),
        "advantages": torch.randn(t, generator=gen).to(dev),
        "old_logp": (logp + 0.1 * torch.randn(t, generator=gen)).to(dev),
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
        return [(w * get_loss(n).fn(inp, params).coefficient)[0] for n in names]

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
    data = inputs(args)
    t, h, v, k = args.tokens, args.hidden, args.vocab, len(names)
    budget = int((args.budget_mib or t * v * 12 / 8 / 2**20) * 2**20)
    engine_plan = plan(t, v, h, k, budget)

    def run() -> Any:
        if args.child == "gemm":
            return data["hidden"] @ data["weight"].T
        if args.child == "naive":
            return naive(names, data)
        res = lm_head_pass(
            data["hidden"], data["weight"], data["tokens"], coefficient_fn(names, data), engine_plan
        )
        return res

    sync(args.device)
    base = memory_baseline(args.device)
    result = run()  # warm-up
    sync(args.device)
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        result = run()
        sync(args.device)
        times.append(time.perf_counter() - start)
    peak = memory_peak(args.device) - base
    out: dict[str, Any] = {
        "method": args.child,
        "seconds": statistics.median(times),
        "peak_extra_bytes": peak,
        "times": times,
    }
    if args.child == "naive":
        out["norms"] = [n.double().cpu().tolist() for n in result]
    if args.child == "engine":
        out["norms"] = [r.norms.double().cpu().tolist() for r in result.rows]
        out["gemm_equivalents"] = result.gemm_equivalents
        out["plan"] = {
            "vocab_chunk": engine_plan.vocab_chunk,
            "resident_chunks": engine_plan.resident,
        }
    return out


def _run(cmd: list[str], env: Any) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
    return proc.stdout.strip().splitlines()[-1]


def main() -> None:
    args = parse()
    if args.child:
        print(json.dumps(child(args)))
        return
    results = {}
    for method in args.methods.split(","):
        cmd = [sys.executable, __file__, "--child", method]
        for key, value in vars(args).items():
            if key not in ("child", "json") and value is not None:
                cmd += [f"--{key.replace('_', '-')}", str(value)]
        timed = json.loads(_run(cmd, os.environ))
        if args.device == "cpu":
            # Memory in a second child where large blocks always come from mmap and go back to
            # the OS when freed, so that the resident set follows the live tensors (glibc's
            # dynamic threshold keeps freed set-up buffers resident and hides the method's own
            # peak). Page faults slow that child down, so its times are not used.
            measured = json.loads(_run(cmd, {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}))
            timed["peak_extra_bytes"] = measured["peak_extra_bytes"]
        results[method] = timed

    k = len(args.losses.split(","))
    summary: dict[str, Any] = {
        "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(0),
        "machine": platform.platform(),
        "processor": platform.processor(),
        "torch": torch.__version__,
        "threads": args.threads or torch.get_num_threads(),
        "dtype": args.dtype,
        "T": args.tokens,
        "H": args.hidden,
        "V": args.vocab,
        "losses": args.losses.split(","),
    }
    gemm = results.get("gemm", {}).get("seconds")
    if gemm:
        summary["gemm_seconds"] = gemm
        summary["gemm_tflops"] = 2 * args.tokens * args.hidden * args.vocab / gemm / 1e12
        summary["floor_seconds"] = (1 + k) * gemm
    for name in ("naive", "engine"):
        if name in results:
            summary[f"{name}_seconds"] = results[name]["seconds"]
            summary[f"{name}_peak_extra_gib"] = results[name]["peak_extra_bytes"] / 2**30
    if "naive" in results and "engine" in results:
        summary["speedup_vs_naive"] = results["naive"]["seconds"] / results["engine"]["seconds"]
        summary["memory_vs_naive"] = results["engine"]["peak_extra_bytes"] / max(
            results["naive"]["peak_extra_bytes"], 1
        )
        errs = []
        for a, b in zip(results["engine"]["norms"], results["naive"]["norms"], strict=True):
            ta, tb = torch.tensor(a), torch.tensor(b)
            errs.append(float((ta - tb).abs().max() / tb.abs().max()))
        summary["row_norm_rel_err_vs_naive"] = max(errs)
        summary["engine_gemm_equivalents"] = results["engine"]["gemm_equivalents"]
        summary["engine_plan"] = results["engine"]["plan"]
    if gemm and "engine" in results:
        summary["engine_vs_floor"] = results["engine"]["seconds"] / summary["floor_seconds"]
    for key, value in summary.items():
        print(f"{key:28s} {value:.4g}" if isinstance(value, float) else f"{key:28s} {value}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(
                {
                    "summary": summary,
                    "runs": {
                        m: {k2: v2 for k2, v2 in r.items() if k2 != "norms"}
                        for m, r in results.items()
                    },
                },
                fh,
                indent=2,
            )


if __name__ == "__main__":
    main()
