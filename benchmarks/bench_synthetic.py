"""Benchmark: `gradlens compare` on a large synthetic batch, end to end, one child per method.

    python benchmarks/bench_synthetic.py                  # V = 151,936, H = 1,024 (Qwen-sized)
    python benchmarks/bench_synthetic.py --json benchmarks/results/synthetic_V151936_H1024.json

Methods, each in its own child process (wall time and the child's peak resident set,
``ru_maxrss`` from ``wait4``, which includes the interpreter and torch, ~0.3 GB):

- ``source``: the synthetic source alone (`gradlens.sources.build_source`), as `compare` builds
  it: above its materialized size the chunked construction of `gradlens.sources.synthetic_chunked`;
- ``compare``: ``gradlens compare --engine streamed --set source.vocab_size=V
  --set source.hidden_size=H`` (default losses and budget), the command of the performance target;
- ``file``: the same batch dumped to a batch file first (``gradlens dump``, not timed), then
  ``gradlens compare --engine streamed --set source.path=FILE``: the engine without the source,
  for comparison.

The load average before and after each child is recorded: the machine may be shared.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

SOURCE_CHILD = """
import json, sys, time
import torch
from gradlens.compare.run import source_context
from gradlens.config import build_config
from gradlens.sources import build_source
config = build_config(None, sys.argv[1:])
start = time.perf_counter()
batch = build_source(config.source, source_context(config, torch.device("cpu")))
print(json.dumps({"seconds": time.perf_counter() - start, "source": batch.source,
                  "tokens": batch.num_tokens}))
"""


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--vocab", type=int, default=151936, help="source.vocab_size")
    p.add_argument("--hidden", type=int, default=1024, help="source.hidden_size")
    p.add_argument("--methods", default="source,compare,file")
    p.add_argument("--json", default=None, help="write the results here")
    return p.parse_args()


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def run_child(cmd: list[str], out_path: Path) -> dict[str, Any]:
    """Run ``cmd`` with its stdout in ``out_path``: wall time, peak RSS (GiB, from wait4),
    exit status and the load averages before and after."""
    load_before = os.getloadavg()
    start = time.perf_counter()
    with open(out_path, "w", encoding="utf-8") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        stderr = err.read()[-2000:]
    return {
        "command": shown(cmd),
        "seconds": round(seconds, 2),
        "peak_rss_gib": round(usage.ru_maxrss / 2**20, 3),  # ru_maxrss is in KiB on Linux
        "exit_code": proc.returncode,
        "load_before": [round(x, 2) for x in load_before],
        "load_after": [round(x, 2) for x in os.getloadavg()],
        "stderr_tail": stderr,
    }


def shown(cmd: list[str]) -> str:
    """The command as a reader would type it: ``python`` for this interpreter, ``BATCH`` for the
    temporary batch file, the source child's script left out (it is SOURCE_CHILD above)."""
    words = ["python" if w == sys.executable else w for w in cmd]
    words = ["<SOURCE_CHILD>" if w == SOURCE_CHILD else w for w in words]
    return " ".join("source.path=BATCH" if w.startswith("source.path=") else w for w in words)


def main() -> None:
    args = parse()
    overrides = [f"source.vocab_size={args.vocab}", f"source.hidden_size={args.hidden}"]
    sets = [arg for o in overrides for arg in ("--set", o)]
    gradlens = [sys.executable, "-m", "gradlens"]
    results: dict[str, Any] = {
        "machine": platform.platform(),
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "vocab_size": args.vocab,
        "hidden_size": args.hidden,
        "methods": {},
    }
    methods = args.methods.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        for method in methods:
            out = Path(tmp) / f"{method}.out"
            if method == "source":
                cmd = [sys.executable, "-c", SOURCE_CHILD, *overrides]
            elif method == "compare":
                cmd = [*gradlens, "compare", "--engine", "streamed", *sets, "-f", "json"]
            elif method == "file":
                batch = str(Path(tmp) / "batch.safetensors")
                subprocess.run([*gradlens, "dump", *sets, "-o", batch], check=True)
                cmd = [
                    *gradlens, "compare", "--engine", "streamed", "--set", f"source.path={batch}",
                    "-f", "json",
                ]  # fmt: skip
            else:
                raise SystemExit(f"unknown method {method!r}: source, compare, file")
            print(f"{method} ...", file=sys.stderr, flush=True)
            result = run_child(cmd, out)
            text = out.read_text(encoding="utf-8")
            if method == "source" and result["exit_code"] == 0:
                result["child"] = json.loads(text.strip().splitlines()[-1])
            if method in ("compare", "file") and result["exit_code"] == 0:
                rep = json.loads(text)
                result["report"] = {
                    "passed": rep["passed"],
                    "source": rep["batch"]["source"],
                    "num_tokens": rep["batch"]["num_tokens"],
                    "mean_entropy": rep["batch"]["mean_entropy"],
                    "engine": rep["engine"],
                }
            results["methods"][method] = result
            print(json.dumps(result, indent=1), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
