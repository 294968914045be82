"""Compile every variant of the fused engine's kernels for a GPU, without one.

    python tests/engine/compile_kernels.py [ARCH ...]      # default: 90 (H100, H200)

Triton compiles ahead of time to a cubin with the ptxas it ships, given the argument types
instead of tensors; no driver or device is needed. This catches what the interpreter cannot:
type errors of the compiled language (loop-carried values, constexpr branches, pointer and
dtype mismatches). Run in a process where TRITON_INTERPRET is unset (Triton reads it when
imported). Prints one line per variant and exits non-zero on the first failure.
"""

from __future__ import annotations

import sys

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from gradlens.engine import fused_kernels as K

ACC = {"fp32": tl.float32, "fp64": tl.float64}


def compile_one(fn, pointers: dict[str, str], constexprs: dict, arch: int) -> None:
    """Every argument not in ``pointers`` or ``constexprs`` is an int32 scalar."""
    signature = {name: pointers.get(name, "i32") for name in fn.arg_names}
    signature.update(dict.fromkeys(constexprs, "constexpr"))
    source = ASTSource(fn, signature, constexprs)
    triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": 4})


def variants(blocks: K.Blocks):
    """(name, kernel, pointer types, constexprs) for each launch the fused engine can make:
    operand dtypes bf16 (GEMM operands bf16, statistics fp32), fp32 and fp64."""
    for operand, acc in (("bf16", "fp32"), ("fp32", "fp32"), ("fp64", "fp64")):
        stats = dict.fromkeys(
            ("max_ptr", "z_y_ptr", "max_abs_ptr", "log_sum_ptr", "h_ptr", "w_ptr", "coef_ptr",
             "entropy_ptr", "max_other_ptr", "other_mass_ptr", "other_max_ptr", "norms_ptr"),
            f"*{acc}",
        )  # fmt: skip
        # the float64 block sums the zero-sum check reads, whatever the softmax dtype
        wide = dict.fromkeys(
            ("sum_ptr", "tilt_ptr", "mass_ptr", "bonus_sum_ptr", "col_sum_ptr"), "*fp64"
        )
        gemm = operand if operand == "bf16" else acc
        ptrs = {
            **stats,
            **wide,
            "z_ptr": f"*{operand}",
            "tokens_ptr": "*i64",
            "p_ptr": f"*{gemm}",
            "e_ptr": f"*{gemm}",
            "d_ptr": f"*{gemm}",
            "delta_ptr": f"*{gemm}",
            "bonus_ptr": f"*{gemm}",
        }
        token_tile = {"ACC": ACC[acc], "BLOCK_M": blocks.token_rows, "BLOCK_V": blocks.vocab_cols}
        row_tile = {"ACC": ACC[acc], "BLOCK_V": blocks.vocab_rows, "BLOCK_H": blocks.hidden_cols}
        for flag in (False, True):
            yield (
                f"normaliser_chunk {operand} entropy={flag}",
                K._normaliser_chunk,
                ptrs,
                {"ENTROPY": flag, **token_tile},
            )
            yield (
                f"probs_chunk {operand} entropy={flag}",
                K._probs_chunk,
                ptrs,
                {
                    "ENTROPY": flag,
                    **token_tile,
                },
            )
            yield (
                f"row_stats {operand} delta=bonus={flag}",
                K._row_stats,
                ptrs,
                {
                    "DELTA": flag,
                    "BONUS": flag,
                    **row_tile,
                },
            )


def main(archs: list[int]) -> None:
    if K.INTERPRETING:
        sys.exit("TRITON_INTERPRET is set: unset it to compile")
    for arch in archs:
        for name, fn, ptrs, constexprs in variants(K.Blocks()):
            compile_one(fn, ptrs, constexprs, arch)
            print(f"sm_{arch} {name}: compiled", flush=True)


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [90])
