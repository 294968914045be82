"""Benchmark: the model source's default run on a SmolLM2-135M-shaped checkpoint, on CPU.

    python benchmarks/bench_model_source.py --results-dir benchmarks/results

The checkpoint (built once under ``--model-dir``, seeded, nothing downloaded): a random
``LlamaForCausalLM`` of SmolLM2-135M's shape — hidden 576, 30 layers, 9 attention heads, 3
key-value heads, MLP 1536, vocabulary 49,152, tied embeddings — 134.5M parameters. Its
tokenizer is the built-in model's byte-level BPE (2,048 entries) with the vocabulary padded to
49,152 by filler entries (``x2048`` …) that decode as plain text, so every lm_head row has a
token; prompts tokenise exactly as the built-in model's (about three characters per token,
a little longer than SmolLM2's own tokenizer would make them).

The run is the default one — ``gradlens compare --source model --set source.path=DIR``: 4
prompts × 4 completions of at most 24 tokens, the rollout dtype by the CPU (auto), 2 stale Adam
steps on ppo_clip to the default target KL, 4 losses (reinforce, ppo, ppo_clip, sft), the
lm_head diagnostics (streamed above 2^24 entries: 384 × 49,152 is) and the whole-model
gradients — with one change: ``source.reward=length``. A random model samples nearly uniformly
from 49,152 tokens, so every completion runs to 24 tokens (384 completion tokens, the size the
goal is stated for), and python_syntax gives every such completion 0, hence every advantage 0
and stale steps with a zero update; with the length reward the advantages differ within each
group and the stale steps and their learning-rate search do the work they do on a real model.

Each repeat runs in a child process (``--child``) that imports gradlens and runs the run as the
CLI does, with a progress callback that records the wall and CPU time of each phase (loading,
sampling, stale steps, lm_head diagnostics, whole-model gradients; the rest — imports, rewards,
report — is the remainder), and ends as the console entry point does
(`gradlens.cli.process_exit`: output flushed, exit handlers run, no teardown). The parent reads
the child's peak resident memory from the kernel (``os.wait4``'s ru_maxrss) and how busy the
machine was meanwhile: /proc/loadavg, and the CPU time all processes spent (/proc/stat) minus
the child's own, per second of the run ("other load", in cores). CPU time over wall time per
phase shows whether a phase keeps both cores busy (torch.get_num_threads() is reported). Right
after each run a second child measures the baseline: one plain forward and backward of the
checkpoint through transformers alone over a padded batch of the run's grid; the run's time in
those units (``in_baselines``) does not drift with the machine's speed as seconds do. Medians
over ``--repeats``; the JSON keeps every repeat.

The GEMM floor: before the repeats, one more child runs the run with every matrix product
recorded (``--count-products``: a dispatch mode notes each mm, addmm, bmm and baddbmm by its
operands' shapes, dtype and layout, and the phase it ran in; recording slows that run, so it is
not timed). Right after each repeat, the baseline's child also times each distinct product of
the list alone (random operands of that shape, dtype and layout, repeated for at least 20 ms,
the faster of two rounds) and sums count × time: ``gemm_floor_seconds``, what the run's
products take back to back on the machine at that moment, by phase too ("other": outside the
phases, e.g. the rollout's prompt forward before its first step). The run's wall time over it
(``in_gemm_floors``) says how much of the run is anything but its products: attention, the
elementwise work of the blocks, the optimizer, Python, imports.
The goal it is measured against: under 30 s and 2.5 GB on the 2-core development machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

GOAL_SECONDS = 30.0
GOAL_BYTES = 2.5e9
SHAPE = {
    "vocab_size": 49152,
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "max_position_embeddings": 8192,
    "tie_word_embeddings": True,
    "rms_norm_eps": 1e-5,
    "rope_theta": 100000.0,
    "bos_token_id": 0,
    "eos_token_id": 0,
    "pad_token_id": 0,
}
OVERRIDES = ["source.reward=length"]


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--model-dir",
        default=str(Path(tempfile.gettempdir()) / "gradlens-bench-smollm2-135m-shaped"),
        help="where the checkpoint is built (once) and read",
    )
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--set", action="append", default=[], help="more overrides, KEY=VALUE")
    p.add_argument("--results-dir", default=None, help="write model_source_cpu.json here")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--baseline-grid", type=int, nargs=2, help=argparse.SUPPRESS)
    p.add_argument("--count-products", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--products", default=None, help=argparse.SUPPRESS)
    return p.parse_args()


def build_checkpoint(where: Path) -> None:
    """The SmolLM2-135M-shaped random Llama with the padded built-in tokenizer."""
    import torch
    import transformers

    from gradlens.sources.checkpoint import builtin_model_dir

    if (where / "model.safetensors").is_file():
        return
    where.mkdir(parents=True, exist_ok=True)
    src = builtin_model_dir()
    data = json.loads((src / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = data["model"]["vocab"]
    for i in range(len(vocab), SHAPE["vocab_size"]):
        vocab[f"x{i}"] = i
    (where / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    config = json.loads((src / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["model_max_length"] = SHAPE["max_position_embeddings"]
    (where / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SHAPE))
    model.save_pretrained(where)


# aten ops; addmm, baddbmm: a bias + a product (in place with a trailing underscore)
PRODUCTS = ("mm", "addmm", "addmm_", "bmm", "baddbmm", "baddbmm_")
BIASED = ("addmm", "addmm_", "baddbmm", "baddbmm_")


def operand_layout(t: Any) -> str:
    """'t' for a transposed (column-major) matrix view, else 'n': the GEMM kernel differs."""
    return "t" if t.dim() >= 2 and t.stride(-2) == 1 and t.shape[-2] > 1 else "n"


def count_products(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The run's matrix products: each distinct (phase, op, dtype, shapes, layouts) with its
    count (module docstring). The run is not timed."""
    import collections

    from torch.utils._python_dispatch import TorchDispatchMode

    from gradlens.compare import run_compare
    from gradlens.config import build_config
    from gradlens.progress import reporting

    counts: collections.Counter[tuple[Any, ...]] = collections.Counter()
    current = ["other"]

    class Recorder(TorchDispatchMode):
        def __torch_dispatch__(
            self,
            func: Any,
            types: Any,
            args: tuple[Any, ...] = (),
            kwargs: dict[str, Any] | None = None,
        ) -> Any:
            name = func._overloadpacket.__name__
            if name in PRODUCTS:
                a, b = args[1:3] if name in BIASED else args[:2]
                op = "bmm" if a.dim() == 3 else "mm"
                dtype = str(a.dtype).removeprefix("torch.")
                layout = operand_layout(a) + operand_layout(b)
                counts[(current[0], op, dtype, tuple(a.shape), tuple(b.shape), layout)] += 1
            return func(*args, **(kwargs or {}))

    def callback(task: str, completed: int, total: int) -> None:
        current[0] = "other" if completed >= total else task

    with reporting(callback), Recorder():
        run_compare(build_config(None, run_overrides(args)))
    fields = ("phase", "op", "dtype", "a", "b", "layout")
    return [{**dict(zip(fields, key, strict=True)), "count": n} for key, n in counts.items()]


def gemm_floor(products: list[dict[str, Any]]) -> dict[str, float]:
    """Seconds the products take alone, by phase and in all: each distinct product timed on
    random operands of its shape, dtype and layout, repeated for at least 20 ms, the faster
    of two such rounds."""
    import torch

    def operand(shape: list[int], dtype: torch.dtype, transposed: bool) -> torch.Tensor:
        if not transposed:
            return torch.randn(shape).to(dtype)
        return torch.randn([*shape[:-2], shape[-1], shape[-2]]).to(dtype).transpose(-1, -2)

    per_call: dict[tuple[Any, ...], float] = {}
    floor: dict[str, float] = {"all": 0.0}
    for p in products:
        key = (p["op"], p["dtype"], tuple(p["a"]), tuple(p["b"]), p["layout"])
        if key not in per_call:
            dtype = getattr(torch, p["dtype"])
            a = operand(p["a"], dtype, p["layout"][0] == "t")
            b = operand(p["b"], dtype, p["layout"][1] == "t")
            product = torch.bmm if p["op"] == "bmm" else torch.mm
            product(a, b)  # warm-up
            rounds = []
            for _ in range(2):  # the faster round: a floor
                calls, start = 0, time.perf_counter()
                while calls < 3 or time.perf_counter() - start < 0.02:
                    product(a, b)
                    calls += 1
                rounds.append((time.perf_counter() - start) / calls)
            per_call[key] = min(rounds)
        seconds = per_call[key] * p["count"]
        floor[p["phase"]] = floor.get(p["phase"], 0.0) + seconds
        floor["all"] += seconds
    return floor


def run_overrides(args: argparse.Namespace) -> list[str]:
    return [
        "source.kind=model",
        f"source.path={args.model_dir}",
        "diagnostics.top_k=5",
        *OVERRIDES,
        *args.set,
    ]


def child(args: argparse.Namespace) -> dict[str, Any]:
    """One run in this process: the phases' wall and CPU times, and the report's facts."""
    start_wall, start_cpu = time.perf_counter(), time.process_time()
    import torch

    from gradlens.compare import run_compare
    from gradlens.config import build_config
    from gradlens.progress import reporting

    phases: dict[str, dict[str, float]] = {}

    def callback(task: str, completed: int, total: int) -> None:
        now, cpu = time.perf_counter(), time.process_time()
        phase = phases.setdefault(task, {"start": now, "cpu_start": cpu})
        if completed >= total:
            phase["seconds"] = now - phase["start"]
            phase["cpu_seconds"] = cpu - phase["cpu_start"]

    imported = time.perf_counter() - start_wall
    with reporting(callback):
        report = run_compare(build_config(None, run_overrides(args)))
    total = time.perf_counter() - start_wall
    model = report.model
    assert model is not None and model.staleness is not None and model.rollout is not None
    assert model.gradient_pass is not None
    return {
        "seconds": total,
        "grid": [
            report.batch.num_sequences,
            model.gradient_pass.padded_positions // report.batch.num_sequences,
        ],
        "cpu_seconds": time.process_time() - start_cpu,
        "import_seconds": imported,
        "threads": torch.get_num_threads(),
        "phases": {
            k: {"seconds": v.get("seconds"), "cpu_seconds": v.get("cpu_seconds")}
            for k, v in phases.items()
        },
        "passed": report.passed,
        "failed_checks": [f"{c.name} {c.loss}" for c in report.checks if not c.passed],
        "completion_tokens": report.batch.num_tokens,
        "sequences": report.batch.num_sequences,
        "losses": [r.name for r in report.losses],
        "engine": report.engine.path,
        "rollout_dtype": model.rollout.logp_definition,
        "stale_pass": dump(model.staleness.model_pass),
        "gradient_pass": dump(model.gradient_pass),
        "stale_trajectory": [
            {
                "step": s.step,
                "lr": s.lr,
                "probes": s.probes,
                "subset_probes": s.subset_probes,
                "kl_k3": s.kl_k3,
                "clip_region": s.clip_region,
            }
            for s in model.staleness.trajectory
        ],
        "parameters": model.model.parameters,
        "notes": model.notes,
    }


def plain_forward_backward(model_dir: str, rows: int, width: int) -> float:
    """The baseline, in a process of its own right after the run (so that the run's peak
    memory is its own): one forward and backward of the checkpoint through transformers alone
    (its own loss, float32, no gradlens) over a padded batch of the run's grid [rows, width] —
    the least a run that takes one gradient of the batch costs. The faster of two, after one
    warm-up."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ids = torch.randint(0, model.config.vocab_size, (rows, width), generator=torch.Generator())
    times = []
    for _ in range(3):
        start = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        times.append(time.perf_counter() - start)
        model.zero_grad(set_to_none=True)
    return min(times[1:])


def dump(section: Any) -> Any:
    return None if section is None else section.model_dump()


def busy_jiffies() -> int:
    """CPU time all processes have spent, in clock ticks (/proc/stat: user + nice + system +
    irq + softirq + steal)."""
    with open("/proc/stat", encoding="ascii") as fh:
        fields = [int(x) for x in fh.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return user + nice + system + irq + softirq + steal


def loadavg() -> list[float]:
    with open("/proc/loadavg", encoding="ascii") as fh:
        return [float(x) for x in fh.read().split()[:3]]


def child_command(args: argparse.Namespace, *flags: str) -> list[str]:
    cmd = [sys.executable, __file__, *flags, "--model-dir", args.model_dir]
    for s in args.set:
        cmd += ["--set", s]
    return cmd


def run_once(args: argparse.Namespace, products: str) -> dict[str, Any]:
    """A child run with its peak memory and the machine's other load; then the baseline and
    the GEMM floor of the products listed in the file ``products``."""
    cmd = child_command(args, "--child")
    before_load, before_busy = loadavg(), busy_jiffies()
    start = time.perf_counter()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - start
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(), err.read().decode()
    if proc.returncode != 0:
        raise SystemExit(f"the child run failed ({proc.returncode}):\n{stderr[-3000:]}")
    ticks = os.sysconf("SC_CLK_TCK")
    child_cpu = usage.ru_utime + usage.ru_stime
    other = (busy_jiffies() - before_busy) / ticks - child_cpu
    after_load = loadavg()
    result = json.loads(stdout.strip().splitlines()[-1])
    rows, width = result["grid"]
    baseline = subprocess.run(
        [sys.executable, __file__, "--model-dir", args.model_dir, "--baseline-grid", str(rows),
         str(width), "--products", products],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    measured = json.loads(baseline.stdout.strip().splitlines()[-1])
    baseline_seconds = float(measured["baseline_seconds"])
    floor = measured["gemm_floor_seconds"]
    result.update(
        {
            "process_seconds": wall,
            "baseline_seconds": baseline_seconds,
            # the run's wall time in plain forward+backward passes measured right after it
            "in_baselines": wall / baseline_seconds,
            # what the run's matrix products alone take, measured right after it, by phase
            "gemm_floor_seconds": floor,
            "in_gemm_floors": wall / floor["all"],
            "peak_rss_bytes": usage.ru_maxrss * 1024,
            "child_cpu_seconds": child_cpu,
            "other_load_cores": max(other, 0.0) / wall,
            "loadavg_before": before_load,
            "loadavg_after": after_load,
        }
    )
    return result


def machine() -> dict[str, Any]:
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import torch

    caps = getattr(torch.cpu, "get_capabilities", lambda: {})()
    return {
        "cpu": name,
        "cores": os.cpu_count(),
        "memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "native_bf16": bool(caps.get("avx512_bf16") or caps.get("amx_bf16") or caps.get("bf16")),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }


def median(runs: list[dict[str, Any]], *keys: str) -> float | None:
    values = []
    for r in runs:
        x: Any = r
        for k in keys:
            x = None if x is None else x.get(k)
        if x is not None:
            values.append(float(x))
    return statistics.median(values) if values else None


def main() -> None:
    args = parse()
    if args.child:
        from gradlens.cli.process_exit import exit_process

        print(json.dumps(child(args)))
        exit_process(0)  # the process ends as the console entry point's does
    if args.count_products:
        print(json.dumps(count_products(args)))
        return
    if args.baseline_grid:
        baseline = plain_forward_backward(args.model_dir, *args.baseline_grid)
        products = json.loads(Path(args.products).read_text(encoding="utf-8"))
        print(
            json.dumps({"baseline_seconds": baseline, "gemm_floor_seconds": gemm_floor(products)})
        )
        return
    where = Path(args.model_dir)
    build_checkpoint(where)
    counted = subprocess.run(
        child_command(args, "--count-products"), check=True, capture_output=True, text=True
    )
    products = json.loads(counted.stdout.strip().splitlines()[-1])
    runs = []
    with tempfile.TemporaryDirectory() as scratch:
        listed = Path(scratch) / "products.json"
        listed.write_text(json.dumps(products), encoding="utf-8")
        for i in range(args.repeats):
            runs.append(run_once(args, str(listed)))
            report_run(i, runs[-1])
    summarise(args, runs, products)


def report_run(i: int, r: dict[str, Any]) -> None:
    phases = ", ".join(
        f"{k} {v['seconds']:.1f} s ({v['cpu_seconds'] / max(v['seconds'], 1e-9):.2f} cores)"
        for k, v in r["phases"].items()
        if v["seconds"] is not None
    )
    print(
        f"run {i + 1}: {r['process_seconds']:.1f} s ({r['in_baselines']:.1f} plain "
        f"forward+backward passes of {r['baseline_seconds']:.2f} s; "
        f"{r['in_gemm_floors']:.2f} × its products' {r['gemm_floor_seconds']['all']:.1f} s), "
        f"peak {r['peak_rss_bytes'] / 1e9:.2f} GB, "
        f"other load {r['other_load_cores']:.2f} cores, loadavg {r['loadavg_before'][0]:.2f}"
        f"; {phases}",
        flush=True,
    )


def summarise(
    args: argparse.Namespace, runs: list[dict[str, Any]], products: list[dict[str, Any]]
) -> None:
    phase_names = list(runs[0]["phases"])
    flops: dict[str, float] = {}
    for p in products:
        m, k = p["a"][-2:]
        n = p["b"][-1]
        batch = p["a"][0] if p["op"] == "bmm" else 1
        key = f"{p['phase']} ({p['dtype']})"
        flops[key] = flops.get(key, 0.0) + 2.0 * batch * m * k * n * p["count"]
    floor_phases = sorted({k for r in runs for k in r["gemm_floor_seconds"]})
    summary = {
        "benchmark": "model source default run, SmolLM2-135M-shaped random checkpoint",
        "machine": machine(),
        "overrides": OVERRIDES + args.set,
        "goal": {"seconds": GOAL_SECONDS, "peak_rss_bytes": GOAL_BYTES},
        "product_flops": flops,
        "median": {
            "seconds": median(runs, "process_seconds"),
            "peak_rss_bytes": median(runs, "peak_rss_bytes"),
            "cpu_seconds": median(runs, "child_cpu_seconds"),
            "other_load_cores": median(runs, "other_load_cores"),
            "baseline_seconds": median(runs, "baseline_seconds"),
            "in_baselines": median(runs, "in_baselines"),
            "gemm_floor_seconds": {p: median(runs, "gemm_floor_seconds", p) for p in floor_phases},
            "in_gemm_floors": median(runs, "in_gemm_floors"),
            # the machine's speed drifts within a run (a virtual machine): the least of the
            # repeats' floors is the products at its fastest
            "gemm_floor_seconds_least": min(r["gemm_floor_seconds"]["all"] for r in runs),
            "phases": {p: median(runs, "phases", p, "seconds") for p in phase_names},
            "phase_cores": {
                p: (median(runs, "phases", p, "cpu_seconds") or 0.0)
                / max(median(runs, "phases", p, "seconds") or 1e-9, 1e-9)
                for p in phase_names
            },
        },
        "runs": runs,
    }
    med = summary["median"]
    summary["meets_goal"] = {
        "seconds": med["seconds"] is not None and med["seconds"] < GOAL_SECONDS,
        "peak_rss_bytes": med["peak_rss_bytes"] is not None and med["peak_rss_bytes"] < GOAL_BYTES,
    }
    print(json.dumps({k: summary[k] for k in ("machine", "median", "meets_goal")}, indent=1))
    if args.results_dir:
        out = Path(args.results_dir) / "model_source_cpu.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
