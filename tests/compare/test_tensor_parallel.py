"""`gradlens compare` on P tensor-parallel ranks reports what one process reports.

Each world size is one `run_ranks` launch (P spawned processes, gloo) in which every rank runs
`run_compare` on a list of configs; each rank's JSON report is compared, number by number, with
the single-process streamed run of the same config in float64: the synthetic default (also with
the entropy bonus, μ_old, π_ref and a parity pair, and with the losses that read the entropies
and the prompt groups under the top-entropy selection), a batch file split at load, per-rank batch
files holding an uneven split, and the built-in model. Then the failures: a user error on one
rank ends every rank with the same message; inputs that differ between the ranks are refused;
the command line under real launches (one process per rank, as torchrun starts them, and
torchrun itself) prints the report once, and on a failure every rank exits 2 with one clear
message.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import build_batch, random_kept
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from gradlens.batchfile import write_batch
from gradlens.cli import app
from gradlens.compare import run_compare
from gradlens.compare.tensor_parallel import ranks_failed, shard_batch
from gradlens.config import build_config
from gradlens.engine.launch import run_ranks
from gradlens.engine.vocab_split import VocabSplit, balanced_split
from gradlens.errors import GradlensError
from gradlens.grads import softmax_view
from gradlens.sources.batch import dump_tensors

REPO = Path(__file__).resolve().parents[2]
runner = CliRunner()

# float64 throughout: the two runs differ only in the order of the sums over the vocabulary
# (chunk and shard boundaries) and of the logsumexp combination, a few hundred ulps at most
# relative to each number's own size (tests/engine/test_vocab_parallel.py holds the engine's
# every field to the same bound).
RTOL = 1e-12
# Rounding residuals (Σ_v of a zero-sum gradient as summed, relative to its size): any change of
# the order of the sums changes their digits completely. They are relative errors of order
# 1e-15 in float64; compared by absolute difference, with the same bound.
# The post-hoc formula against the sampled check's autograd (`post_max_rel_err`) likewise.
RESIDUALS = {"logits_max_abs", "logits_max_rel", "weight_rel", "post_max_rel_err"}
AGREEMENT_ERRORS = {"coefficient", "grad_logits", "grad_weight"}
NUMBER = re.compile(r"-?\d+(\.\d+)?(e[-+]?\d+)?")
# How the engine ran, which legitimately differs: its own chunking of V_r rows, the reason.
ENGINE_RUN = {"reason", "vocab_chunk", "resident_chunks", "budget_bytes"}

F64 = ["dtype=float64"]
SYNTHETIC = [
    *F64,
    "loss.entropy_coef=0.05",
    "source.rollout_drift=0.1",
    "source.ref_drift=0.2",
    "losses=[reinforce,ppo_clip,grpo,gspo,cispo,sft]",
    "parity={pairs: [[ppo, ppo_clip]]}",
]
# losses that read pass 1's H_t (aspo, the top-entropy selection, the bonus weighted by S_t) and
# the prompt groups (real): the ranks combine H_t in pass 1's collective
SELECTION = [
    *F64,
    "loss.entropy_coef=0.05",
    "loss.top_entropy_quantile=0.3",
    "source.rollout_drift=0.1",
    "losses=[ppo_clip,aspo,real,dppo_tv]",
]
# the built-in model, small: 2 prompts × 2 completions of ≤ 8 tokens, one stale step
MODEL = [
    *F64,
    "source.kind=model",
    "source.num_prompts=2",
    "source.group_size=2",
    "source.max_new_tokens=8",
    "source.stale.steps=1",
]


# --- comparing two reports ---------------------------------------------------------------------


def differences(one: Any, tp: Any, path: str = "") -> list[str]:
    """Every field where the tensor-parallel report ``tp`` differs from ``one``."""
    if isinstance(one, dict) and isinstance(tp, dict):
        out = []
        for key in sorted(set(one) | set(tp)):
            where = f"{path}.{key}"
            if key not in one or key not in tp:
                out.append(f"{where}: in one report only")
            elif key in RESIDUALS and isinstance(one[key], float):
                if not math.isclose(one[key], tp[key], rel_tol=0, abs_tol=RTOL):
                    out.append(f"{where}: {one[key]!r} != {tp[key]!r}")
            elif path.endswith(".agreement") and key in AGREEMENT_ERRORS and one[key] is not None:
                # the engine against autograd: relative errors of rounding size, as RESIDUALS
                if not math.isclose(one[key], tp[key], rel_tol=0, abs_tol=RTOL):
                    out.append(f"{where}: {one[key]!r} != {tp[key]!r}")
            elif key == "detail" and path.startswith(".checks"):  # residuals written in words
                if NUMBER.sub("#", one[key]) != NUMBER.sub("#", tp[key]):
                    out.append(f"{where}: {one[key]!r} != {tp[key]!r}")
            else:
                out += differences(one[key], tp[key], where)
        return out
    if isinstance(one, list) and isinstance(tp, list):
        if len(one) != len(tp):
            return [f"{path}: {len(one)} items != {len(tp)}"]
        return [
            d
            for i, (a, b) in enumerate(zip(one, tp, strict=True))
            for d in differences(a, b, f"{path}[{i}]")
        ]
    if isinstance(one, float) or isinstance(tp, float):
        numbers = all(isinstance(x, (int, float)) for x in (one, tp))
        if numbers and math.isclose(one, tp, rel_tol=RTOL, abs_tol=1e-300):
            return []
    return [] if one == tp else [f"{path}: {one!r} != {tp!r}"]


def assert_same_report(one: dict, tp: dict, rows: list[int], ignore: tuple[str, ...] = ()) -> None:
    """``tp`` (a run on len(rows) ranks holding ``rows`` vocabulary rows each) reports what
    ``one`` (one process, the streamed engine) reports; ``ignore``: dotted paths that differ by
    construction (a per-rank file's name)."""
    one, tp = copy.deepcopy(one), copy.deepcopy(tp)
    e1, e2 = one.pop("engine"), tp.pop("engine")
    assert (e1["path"], e1["tensor_parallel"], e1["vocab_rows"]) == ("streamed", 1, None)
    assert (e2["path"], e2["tensor_parallel"], e2["vocab_rows"]) == ("streamed", len(rows), rows)
    assert e2["reason"] == f"tensor_parallel = {len(rows)}: the vocab-parallel engine"
    # the GEMMs of all ranks together, in units of one whole logits GEMM: the same work (the
    # count includes the dense products a loss shares with an earlier one where their c_t are
    # bitwise equal, which the last ulps of log π can change: hence a tolerance)
    assert e2["gemm_equivalents"] == pytest.approx(e1["gemm_equivalents"], rel=1e-9)
    for key in ENGINE_RUN | {"path", "tensor_parallel", "vocab_rows", "gemm_equivalents"}:
        e1.pop(key), e2.pop(key)
    assert e1 == e2
    d1, d2 = one["config"]["diagnostics"], tp["config"]["diagnostics"]
    assert (d1.pop("tensor_parallel"), d2.pop("tensor_parallel")) == (1, len(rows))
    assert (d1.pop("engine"), d2.pop("engine")) == ("streamed", "auto")
    for dotted in ignore:
        *head, last = dotted.split(".")
        for report in (one, tp):
            node = report
            for part in head:
                node = node[part]
            node.pop(last)
    diffs = differences(one, tp)
    assert not diffs, "\n".join(diffs[:40])


# --- the runs ----------------------------------------------------------------------------------


NO_REFERENCE = "diagnostics.reference=none"


def config_of(overrides: list[str], *more: str):
    """The config of ``overrides``; a first entry ``@NAME`` names a shipped config file."""
    path = None
    if overrides and overrides[0].startswith("@"):
        path, overrides = REPO / "configs" / overrides[0][1:], overrides[1:]
    return build_config(path, [*overrides, *more])


def single(overrides: list[str]) -> dict:
    """One process, the streamed engine, one torch thread (as each rank has: the model source's
    forward passes give bitwise the same hidden states only with the same threading)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        # no reference in either run (the sampled check under tensor parallelism has its own
        # comparison below: its agreement errors are rounding residuals)
        config = config_of(overrides, "diagnostics.engine=streamed", NO_REFERENCE)
        return run_compare(config).model_dump(mode="json")
    finally:
        torch.set_num_threads(threads)


def compare_ranks(rank: int, world: int, runs: list[list[str]]) -> list[dict]:
    """Run on every rank: each config's report, with ``diagnostics.tensor_parallel`` = world."""
    out = []
    for overrides in runs:
        config = config_of(overrides, f"diagnostics.tensor_parallel={world}", NO_REFERENCE)
        out.append(run_compare(config).model_dump(mode="json"))
    return out


def write_full(path: Path, overrides: list[str]) -> Path:
    """The batch of a synthetic config, as a batch file."""
    batch = build_batch(build_config(None, overrides))
    write_batch(path, dump_tensors(batch))
    return path


def write_per_rank(full: Path, split: VocabSplit) -> str:
    """``full`` as one file per rank, each with its rows of W; the ``{rank}`` path."""
    data = load_file(str(full))
    weight = data.pop("lm_head_weight")
    for r in range(split.world):
        v0, v1 = split.shard(r)
        rows = {
            "lm_head_weight": weight[v0:v1].clone(),
            "vocab_offset": torch.tensor(v0),
            "vocab_size": torch.tensor(split.vocab),
        }
        save_file({**data, **rows}, str(full.parent / f"rank{r}.safetensors"))
    return str(full.parent / "rank{rank}.safetensors")


@pytest.fixture(scope="module")
def batch_files(tmp_path_factory) -> dict[str, Any]:
    """A float64 batch file with μ_old and π_ref; per-rank files of it for 2 and 3 ranks."""
    folder = tmp_path_factory.mktemp("tp")
    full = write_full(
        folder / "batch.safetensors", [*F64, "source.rollout_drift=0.1", "source.ref_drift=0.2"]
    )
    out: dict[str, Any] = {"full": str(full)}
    for world, sizes in ((2, [1500, 548]), (3, [1, 1500, 547])):  # lopsided, one row alone
        _, ranked = per_rank_folder(folder / f"world{world}", sizes, full)
        out[world] = (ranked, sizes)
    return out


def batch_runs(
    files: dict[str, Any], world: int
) -> list[tuple[list[str], list[str], list[int], tuple[str, ...]]]:
    """(one-process overrides, tensor-parallel overrides, rows per rank, fields to ignore)."""
    source = ["source.kind=batch"]
    full = [*F64, *source, f"source.path={files['full']}"]
    ranked, sizes = files[world]
    return [
        (full, full, balanced_split(2048, world).sizes, ()),
        (
            full,
            [*F64, *source, f"source.path={ranked}"],
            sizes,
            ("config.source.path", "batch.source"),  # the files' names
        ),
    ]


def check_world(world: int, files: dict[str, Any]) -> None:
    even = balanced_split(2048, world).sizes
    literal = ["@literal_tc.yaml"]  # V = 5: uneven over 2 and 3 ranks
    runs = [
        (F64, F64, even, ()),
        (SYNTHETIC, SYNTHETIC, even, ()),
        (SELECTION, SELECTION, even, ()),
        (literal, literal, balanced_split(5, world).sizes, ()),
        *batch_runs(files, world),
    ]
    reports = run_ranks(compare_ranks, world, ([tp for _, tp, _, _ in runs],), timeout_s=300)
    for i, (one_overrides, _, rows, ignore) in enumerate(runs):
        one = single(one_overrides)
        for rank in range(world):  # every rank returns the same report
            assert_same_report(one, reports[rank][i], rows, ignore)


@pytest.mark.slow
def test_two_ranks_report_what_one_process_reports(batch_files):
    check_world(2, batch_files)


@pytest.mark.slow
def test_two_ranks_report_what_one_process_reports_on_the_builtin_model(batch_files):
    # the model source, whole-model gradients included; on every rank (seeded, one thread each)
    runs = [(MODEL, balanced_split(2048, 2).sizes)]
    reports = run_ranks(compare_ranks, 2, ([tp for tp, _ in runs],), timeout_s=600)
    for i, (overrides, rows) in enumerate(runs):
        one = single(overrides)
        assert one["model"] is not None and one["losses"][0]["model_grads"] is not None
        for rank in range(2):
            assert_same_report(one, reports[rank][i], rows)


@pytest.mark.slow
def test_three_ranks_uneven_report_what_one_process_reports(batch_files):
    # 2048 rows over 3 ranks: 683, 683, 682; the per-rank files 1, 1500, 547
    check_world(3, batch_files)


def replay_runs(folder: Path) -> list[tuple[list[str], list[str], list[int], tuple[str, ...]]]:
    """A float64 batch file with kept sets K_t (half of V at random, y_t in each, random kept
    masses), μ_old and π_ref, read with ``loss.sampling_support: kept``: whole (split at load)
    and as uneven per-rank files. Mean entropy 1.5 nats: a peaked π whose rivals of y_t fall
    outside K_t gives π̃(y_t) ≈ 1, and the sampled row c_t h_t(1 − π̃_y) is then computed with a
    cancellation that costs 1/(1 − π̃_y) ulps in either run, beyond this test's 1e-12."""
    overrides = [*F64, "source.entropy=1.5", "source.rollout_drift=0.1", "source.ref_drift=0.2"]
    batch = build_batch(build_config(None, overrides))
    batch = dataclasses.replace(batch, kept=random_kept(batch, 11, keep_share=0.5))
    full = folder / "batch.safetensors"
    write_batch(full, dump_tensors(batch))
    _, ranked = per_rank_folder(folder / "ranked", [700, 1348], full)
    read = [*F64, "source.kind=batch", "loss.sampling_support=kept", "losses=[ppo_clip,grpo,sft]"]
    return [
        ([*read, f"source.path={full}"], [*read, f"source.path={full}"], [1024, 1024], ()),
        (
            [*read, f"source.path={full}"],
            [*read, f"source.path={ranked}"],
            [700, 1348],
            ("config.source.path", "batch.source"),
        ),
    ]


@pytest.mark.slow  # spawns gloo ranks: the full suite runs it
def test_two_ranks_replay_the_kept_sets_as_one_process(tmp_path):
    runs = replay_runs(tmp_path)
    reports = run_ranks(compare_ranks, 2, ([tp for _, tp, _, _ in runs],), timeout_s=300)
    for i, (one_overrides, _, rows, ignore) in enumerate(runs):
        one = single(one_overrides)
        support = one["support"]  # the kept sets' section, replayed
        assert support is not None and support["replayed"] and support["kept_mean"] < 2048
        for rank in range(2):
            assert_same_report(one, reports[rank][i], rows, ignore)


def sampled_ranks(rank: int, world: int, runs: list[list[str]]) -> list[dict]:
    """Run on every rank: each config's report with the reference auto (the sampled check)."""
    out = []
    for overrides in runs:
        config = config_of(overrides, f"diagnostics.tensor_parallel={world}")
        out.append(run_compare(config).model_dump(mode="json"))
    return out


def single_sampled(overrides: list[str]) -> dict:
    """One process, the streamed engine and its sampled check (the reference auto), one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        config = config_of(overrides, "diagnostics.engine=streamed")
        return run_compare(config).model_dump(mode="json")
    finally:
        torch.set_num_threads(threads)


# the default, the entropy bonus with the losses reading H_t (the sampled rows' entropy through
# the split), a literal config with V = 5 (every row sampled: no row outside R)
SAMPLED_RUNS = [F64, SYNTHETIC, SELECTION, ["@literal_tc.yaml"]]


def check_sampled(world: int) -> None:
    reports = run_ranks(sampled_ranks, world, (SAMPLED_RUNS,), timeout_s=300)
    for i, overrides in enumerate(SAMPLED_RUNS):
        one = single_sampled(overrides)
        vocab = one["batch"]["vocab_size"]
        for loss in one["losses"]:
            agreement = loss["agreement"]
            assert agreement["scope"] == "sampled" and agreement["passed"], loss["name"]
        for rank in range(world):
            assert_same_report(one, reports[rank][i], balanced_split(vocab, world).sizes)


@pytest.mark.slow  # spawns gloo ranks: the full suite runs it
def test_two_ranks_run_the_sampled_check_as_one_process():
    check_sampled(2)


@pytest.mark.slow
def test_three_ranks_run_the_sampled_check_as_one_process():
    check_sampled(3)


# --- errors, in processes of one group ---------------------------------------------------------


def error_ranks(rank: int, world: int, runs: list[list[str]]) -> list[str | int]:
    """Run on every rank: each config's error (its type and message), or for a run that
    succeeds its engine's tensor_parallel. The ranks raise together, so the group stays usable."""
    out: list[str | int] = []
    for overrides in runs:
        config = build_config(None, [*overrides, f"diagnostics.tensor_parallel={world}"])
        try:
            out.append(run_compare(config).engine.tensor_parallel)
        except GradlensError as exc:
            out.append(f"{type(exc).__name__}: {exc}")
    return out


def per_rank_folder(folder: Path, sizes: list[int], full: Path | None = None) -> tuple[Path, str]:
    """A folder with a float64 batch file (``full``'s bytes, or the default's) and per-rank
    files of it; the ``{rank}`` path."""
    folder.mkdir(exist_ok=True)
    if full is None:
        full = write_full(folder / "batch.safetensors", F64)
    else:
        full = Path(shutil.copy(full, folder / "batch.safetensors"))
    return folder, write_per_rank(full, VocabSplit.from_sizes(sizes))


@pytest.mark.slow
def test_bad_inputs_stop_every_rank_with_one_message_and_the_group_stays_usable(tmp_path):
    batch = [*F64, "source.kind=batch"]
    # a file only rank 1 cannot read: it is missing
    missing, ranked_missing = per_rank_folder(tmp_path / "missing", [1024, 1024])
    full = missing / "batch.safetensors"
    (missing / "rank1.safetensors").unlink()
    # one number of rank 1's hidden states differs
    differ, ranked_differ = per_rank_folder(tmp_path / "differ", [1024, 1024], full)
    data = load_file(str(differ / "rank1.safetensors"))
    data["hidden_states"][0, 0, 0] += 1e-9
    save_file(data, str(differ / "rank1.safetensors"))
    # rank 1 claims rank 0's rows
    overlap, ranked_overlap = per_rank_folder(tmp_path / "overlap", [1024, 1024], full)
    data = load_file(str(overlap / "rank1.safetensors"))
    data["vocab_offset"] = torch.tensor(0)
    save_file(data, str(overlap / "rank1.safetensors"))
    runs = [
        [*batch, f"source.path={ranked_missing}"],
        [*batch, f"source.path={ranked_differ}"],
        [*batch, f"source.path={ranked_overlap}"],
        F64,
    ]
    on_rank = run_ranks(error_ranks, 2, (runs,), timeout_s=60)
    assert on_rank[0] == on_rank[1]  # the same outcome on every rank
    gone = str(missing / "rank1.safetensors")
    # rank 0 learnt rank 1's error in the exchange at the end of the source phase
    assert on_rank[0][0] == f"SharedError: rank 1 of 2: source.path: no such file: {gone!r}"
    assert on_rank[0][1] == (
        "SharedError: tensor_parallel: every rank must hold the same inputs, and these differ: "
        "hidden (rank 1 against rank 0)"
    )
    assert str(on_rank[0][2]).startswith(
        "SharedError: tensor_parallel: the ranks' rows of the lm_head must be consecutive"
    )
    assert "rank 0 [0, 1024) of 2048; rank 1 [0, 1024) of 2048" in str(on_rank[0][2])
    assert on_rank[0][3] == 2  # a good run after the failed ones


def test_ranks_failed_names_each_failed_rank_once():
    assert ranks_failed(["no file", None, None]) == "rank 0 of 3: no file"
    assert ranks_failed(["same", "same"]) == "every rank of 2: same"
    assert ranks_failed(["a", None, "b"]) == "2 of 3 ranks failed:\n  rank 0: a\n  rank 2: b"


# --- errors in one process ---------------------------------------------------------------------


def test_without_a_process_group_tensor_parallel_is_a_user_error():
    config = build_config(None, ["diagnostics.tensor_parallel=2"])
    with pytest.raises(
        GradlensError,
        match="none is initialised in this process; launch with torchrun --nproc-per-node 2",
    ):
        run_compare(config)


@pytest.mark.parametrize(
    ("override", "words"),
    [
        ("diagnostics.engine=materialized", "engine 'materialized' runs in one process"),
        ("diagnostics.engine=fused", "engine 'fused' runs in one process"),
        ("diagnostics.reference=autograd", "reference 'autograd' differentiates through"),
        ("diagnostics.tensor_parallel=0", "greater than or equal to 1"),
    ],
)
def test_settings_that_cannot_run_under_tensor_parallelism_are_config_errors(override, words):
    with pytest.raises(GradlensError, match="diagnostics") as info:
        build_config(None, ["diagnostics.tensor_parallel=2", override])
    assert words in str(info.value)


def test_one_ranks_batch_file_alone_is_a_user_error(tmp_path):
    _, ranked = per_rank_folder(tmp_path / "files", [1000, 1048])
    config = build_config(None, [*F64, "source.kind=batch", f"source.path={ranked}"])
    with pytest.raises(
        GradlensError, match=r"rank0.safetensors holds rows \[0, 1000\) of the lm_head's 2048"
    ):
        run_compare(config)


def test_shard_batch_keeps_the_ranks_rows_and_the_whole_vocabulary():
    batch = build_batch(build_config(None, ["source.vocab_size=11", "source.entropy=0.3"]))
    parts = [shard_batch(batch, r, 3) for r in range(3)]
    assert [p.weight.shape[0] for p in parts] == [4, 4, 3]
    assert all(p.vocab_size == 11 for p in parts)
    assert torch.equal(torch.cat([p.weight for p in parts]), batch.weight)
    assert shard_batch(parts[1], 1, 3) is parts[1]  # already split: as it is
    with pytest.raises(GradlensError, match=r"holds rows \[4, 8\) of 11"):
        softmax_view(parts[1])  # the materialized engine's softmax needs every row


# --- the command line, one process per rank ---------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(argv: list[str], world: int, timeout: float = 300) -> list[tuple[int, str, str]]:
    """``python -m gradlens ARGV`` in ``world`` processes with the environment torchrun gives
    each rank; (exit status, stdout, stderr) of each. ``timeout`` guards against a hang."""
    port = str(free_port())
    path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    procs = []
    for rank in range(world):
        env = {
            **os.environ,
            "PYTHONPATH": path,
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world),
            "LOCAL_WORLD_SIZE": str(world),
            "OMP_NUM_THREADS": "1",
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "gradlens", *argv],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    try:
        out = [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return [(p.returncode, o, e) for p, (o, e) in zip(procs, out, strict=True)]


BOOM = """
import os
import torch

def boom(logp, old_logp, advantages, mask):
    if os.environ["RANK"] == "1":
        raise ValueError("boom on rank 1")
    return -(advantages * logp * mask).sum() / mask.sum()
"""


@pytest.mark.slow
def test_a_user_error_on_one_rank_ends_every_rank_with_exit_2_and_one_message(tmp_path):
    folder, ranked = per_rank_folder(tmp_path / "files", [1024, 1024])
    (folder / "rank1.safetensors").unlink()
    argv = ["compare", "--tensor-parallel", "2", "--set", f"source.path={ranked}"]
    (rc0, out0, err0), (rc1, out1, err1) = launch(argv, 2)
    assert (rc0, rc1) == (2, 2), (err0, err1)
    assert out0 == out1 == ""
    missing = str(folder / "rank1.safetensors")
    # rank 0 reports rank 1's error, once; rank 1 says nothing more
    assert " ".join(err0.split()) == f"error: rank 1 of 2: source.path: no such file: {missing!r}"
    assert "error" not in err1


@pytest.mark.slow
def test_a_rank_that_fails_inside_the_engine_stops_the_other_at_its_next_collective(tmp_path):
    (tmp_path / "boom.py").write_text(BOOM)
    argv = [
        "compare",
        "--tensor-parallel",
        "2",
        "--losses",
        f"{tmp_path / 'boom.py'}:boom",
        "--set",
        "diagnostics.collective_timeout_s=60",
    ]
    (rc0, out0, err0), (rc1, out1, err1) = launch(argv, 2)
    assert (rc0, rc1) == (2, 2), (err0, err1)
    assert out0 == out1 == ""
    one0, one1 = " ".join(err0.split()), " ".join(err1.split())
    assert (
        one1.startswith("error: rank 1 of 2: loss ") and "raised ValueError: boom on rank 1" in one1
    )
    # rank 0 was past pass 1 (whose collective rank 1 joined) when rank 1 left
    assert one0.startswith("error: rank 0 of 2: the all_reduce_sum of step 'finish.sum' failed")
    assert "another rank most likely raised or stopped before reaching it" in one0


def test_without_torchrun_tensor_parallel_says_how_to_launch():
    result = runner.invoke(app, ["compare", "--tensor-parallel", "2"])
    assert result.exit_code == 2
    assert "torchrun --nproc-per-node 2 -m gradlens compare --tensor-parallel 2" in " ".join(
        result.output.split()
    )


@pytest.mark.parametrize(
    ("flag", "world", "words"),
    [
        ([], "2", "diagnostics.tensor_parallel is 1, but this is one of 2 processes"),
        (["--tensor-parallel", "2"], "3", "but torchrun started 3 processes"),
    ],
)
def test_a_group_of_the_wrong_size_is_a_user_error(flag, world, words):
    result = runner.invoke(app, ["compare", *flag], env={"RANK": "0", "WORLD_SIZE": world})
    assert result.exit_code == 2
    assert words in " ".join(result.output.split())


# --- torchrun ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_torchrun_prints_the_single_process_report_once():
    # --reference none on both, as in `single` and `compare_ranks`
    argv = ["compare", "--format", "json", "--set", "dtype=float64", "--reference", "none"]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            "-m",
            "gradlens",
            *argv,
            "--tensor-parallel",
            "2",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    tp = json.loads(done.stdout)  # one report: rank 0's alone
    one = runner.invoke(app, [*argv, "--engine", "streamed"])
    assert one.exit_code == 0
    assert_same_report(json.loads(one.stdout), tp, [1024, 1024])


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs 2 CUDA devices")
def test_nccl_two_ranks_report_what_one_process_reports():
    overrides = [*SYNTHETIC, "device=cuda"]
    reports = run_ranks(compare_ranks, 2, ([overrides],), timeout_s=300, device="cuda")
    one = single(overrides)
    for rank in range(2):
        assert_same_report(one, reports[rank][0], [1024, 1024])
