"""Train gradlens's built-in tiny causal LM from scratch, on text that ships with Python.

The model that ``gradlens compare --source model`` loads by default lives in
``gradlens/data/tiny_lm/``; this script reproduces it. Everything is deterministic for a given
Python version (the corpus is that version's standard library) and seed:

1. Corpus: the standard library's ``.py`` sources, test suites included (``encodings/`` code
   tables, ``pydoc_data`` and ``site-packages`` excluded), as a sorted list: code only, which
   is far more regular than prose, so the model's next-token distributions are peaked on it.
   A file is held out for evaluation when crc32(its name) % 20 == 0 (about 5%; the rule does
   not depend on which other files exist, so it is stable across Python versions).
2. Tokenizer: byte-level BPE with the ``tokenizers`` library, trained on the training split,
   vocabulary 2048 with one special token ``<|endoftext|>`` (id 0, the document separator).
3. Model: a Llama-style decoder (``transformers.LlamaForCausalLM``), 4 layers, hidden 192,
   4 heads, MLP 512, context 256, tied input/output embeddings: 2.2M parameters. Small on
   purpose: for a fixed CPU budget a small model that sees many tokens reaches a lower loss.
4. Training: AdamW (β = 0.9, 0.95; weight decay 0.1 on matrices), lr 3e-3 with 100 warm-up
   steps and a cosine decay to 10%, gradient clipping at 1.0, batches of 16 random 256-token
   windows of the training stream, ``--steps`` steps, on 2 CPU threads. The matrix products
   run in bfloat16 (``torch.autocast``; weights, optimizer state and the softmax of the loss
   stay float32), which is what makes the step count fit the 15-minute budget on two cores.
5. Saved in the Hugging Face format in float16, then loaded back through
   ``AutoModelForCausalLM.from_pretrained`` in float32 — the path gradlens uses — and evaluated
   on held-out windows of the library modules and of the test suites: cross-entropy, mean and
   median entropy of the next-token distribution, mean probability of the top token and the
   share of positions where it is ≥ 0.9. The metrics and the command go to ``training.json``.
6. Prompts for rollouts: the first lines of top-level ``def``/``class`` statements in the
   held-out library files, written to ``prompts.json``.

Usage: python scripts/train_tiny_lm.py [--out gradlens/data/tiny_lm] [--steps 4000]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import sysconfig
import time
import zlib
from pathlib import Path

os.environ.setdefault("RAYON_NUM_THREADS", "2")  # the tokenizers library's thread pool
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

import torch

EOS = "<|endoftext|>"
EXCLUDED_DIRS = {"site-packages", "encodings", "pydoc_data"}
TEST_DIRS = {"test", "tests", "idle_test"}
MAX_FILE_BYTES = 300_000  # a few generated tables are larger; they are not prose or code
HELD_OUT_MODULUS = 20


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# ----------------------------------------------------------------------------- corpus


def held_out(name: str) -> bool:
    return zlib.crc32(name.encode()) % HELD_OUT_MODULUS == 0


def is_test(name: str) -> bool:
    """Whether a document ("stdlib:<path in the library>") belongs to a test suite."""
    path = name.split(":", 1)[-1]
    return bool(TEST_DIRS & set(path.split("/")[:-1]))


def corpus(with_tests: bool) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(train, held-out) lists of (name, text), in a fixed sorted order."""
    docs: list[tuple[str, str]] = []
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        excluded = EXCLUDED_DIRS if with_tests else EXCLUDED_DIRS | TEST_DIRS
        if excluded & set(rel.parts[:-1]) or path.stat().st_size > MAX_FILE_BYTES:
            continue
        docs.append(
            (f"stdlib:{rel.as_posix()}", path.read_text(encoding="utf-8", errors="replace"))
        )
    train = [d for d in docs if not held_out(d[0])]
    test = [d for d in docs if held_out(d[0])]
    return train, test


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return tok


def token_stream(tok, texts: list[str]) -> torch.Tensor:
    """All documents, each followed by the separator, as one int64 stream."""
    eos = tok.token_to_id(EOS)
    ids: list[int] = []
    for enc in tok.encode_batch(texts):
        ids.extend(enc.ids)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


def windows(stream: torch.Tensor, starts: torch.Tensor, length: int) -> torch.Tensor:
    return torch.stack([stream[s : s + length] for s in starts.tolist()])  # [B, length]


# ----------------------------------------------------------------------------- model


def build_model(
    vocab_size: int, context: int, eos_id: int, hidden: int, layers: int, mlp: int, heads: int
):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=mlp,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=context,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
    )
    # "eager" attention (explicit matmuls) trains ~10% faster on CPU than SDPA at this size;
    # the saved config keeps the library's default, so users load it like any checkpoint.
    config._attn_implementation = "eager"
    return LlamaForCausalLM(config)


def next_token_loss(model, batch: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy, logits from the tied lm_head; the softmax in float32."""
    hidden = model.model(input_ids=batch).last_hidden_state[:, :-1]
    logits = torch.nn.functional.linear(hidden, model.lm_head.weight)
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1)
    )


def learning_rate(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def evaluate(model, data: torch.Tensor) -> dict[str, float]:
    """Next-token cross-entropy, entropy (mean, median) and top-1 probability (mean, ≥ 0.9)."""
    model.eval()
    ce, ent, top = [], [], []
    for batch in data.split(16):
        logits = model(input_ids=batch).logits[:, :-1].float()  # [B, T-1, V]
        logp = torch.log_softmax(logits, dim=-1)
        ce.append(-logp.gather(-1, batch[:, 1:, None]).flatten())
        ent.append(-(logp.exp() * logp).sum(-1).flatten())
        top.append(logp.max(-1).values.exp().flatten())
    model.train()
    ce_t, ent_t, top_t = torch.cat(ce), torch.cat(ent), torch.cat(top)
    return {
        "cross_entropy": float(ce_t.mean()),
        "mean_entropy": float(ent_t.mean()),
        "median_entropy": float(ent_t.median()),
        "mean_top1_prob": float(top_t.mean()),
        "share_top1_ge_0.9": float((top_t >= 0.9).double().mean()),
    }


# ----------------------------------------------------------------------------- prompts


def prompts_from(docs: list[tuple[str, str]], tok, count: int, max_tokens: int) -> list[str]:
    """First lines of top-level def/class statements: up to 2 lines, at most max_tokens."""
    candidates = []
    for name, text in docs:
        if not name.startswith("stdlib:"):
            continue
        lines = text.splitlines(keepends=True)
        for i, line in enumerate(lines):
            if line.startswith(("def ", "class ")) and line.rstrip().endswith(":"):
                prompt = "".join(lines[i : i + 2])
                if len(tok.encode(prompt).ids) <= max_tokens:
                    candidates.append(prompt)
    step = max(1, len(candidates) // count)
    return candidates[::step][:count]


# ----------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("gradlens/data/tiny_lm"))
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--vocab-size", type=int, default=2048)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--eval-windows", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=192)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--mlp", type=int, default=512)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument(
        "--no-tests", dest="tests", action="store_false", help="leave the test suites out"
    )
    parser.add_argument(
        "--autocast",
        choices=["bfloat16", "none"],
        default="bfloat16",
        help="matmul precision of training (master weights and optimizer stay float32)",
    )
    args = parser.parse_args()

    start = time.time()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    train_docs, test_docs = corpus(args.tests)
    log(
        f"corpus: {len(train_docs)} training and {len(test_docs)} held-out documents, "
        f"{sum(len(t) for _, t in train_docs) / 1e6:.2f}M / "
        f"{sum(len(t) for _, t in test_docs) / 1e6:.2f}M characters"
    )
    tok = train_tokenizer([t for _, t in train_docs], args.vocab_size)
    train_ids = token_stream(tok, [t for _, t in train_docs])
    # Held-out windows, evenly spaced, from the library modules and (if trained on) the tests.
    held_parts = {
        "library": [t for name, t in test_docs if not is_test(name)],
        "tests": [t for name, t in test_docs if is_test(name)],
    }
    n_eval = args.eval_windows
    held_data = {}
    for part, texts in held_parts.items():
        if texts:
            ids = token_stream(tok, texts)
            starts = torch.linspace(0, len(ids) - args.context - 1, n_eval).long()
            held_data[part] = windows(ids, starts, args.context)  # [n_eval, context]
    test_ids = token_stream(tok, [t for _, t in test_docs])
    log(f"tokenizer: {tok.get_vocab_size()} entries; {len(train_ids)} / {len(test_ids)} tokens")

    gen = torch.Generator().manual_seed(args.seed)
    train_eval = windows(
        train_ids,
        torch.randint(0, len(train_ids) - args.context, (n_eval,), generator=gen),
        args.context,
    )

    eos_id = tok.token_to_id(EOS)
    model = build_model(
        tok.get_vocab_size(), args.context, eos_id, args.hidden, args.layers, args.mlp, args.heads
    )
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: {n_params / 1e6:.2f}M parameters")
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
    )

    def autocast():
        enabled = args.autocast != "none"
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled)

    model.train()
    curve = []
    train_start = time.time()
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = learning_rate(step, args.steps, args.lr, args.warmup)
        starts = torch.randint(0, len(train_ids) - args.context, (args.batch_size,), generator=gen)
        batch = windows(train_ids, starts, args.context)  # [B, context]
        with autocast():
            loss = next_token_loss(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == args.steps - 1:
            rate = (step + 1) / (time.time() - train_start)
            curve.append({"step": step, "loss": round(loss.item(), 4)})
            log(f"step {step:4d}  loss {loss.item():.4f}  {rate:.2f} steps/s")

    # Save in float16 with the tokenizer, then evaluate what a user of the directory gets.
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    args.out.mkdir(parents=True, exist_ok=True)
    model.to(torch.float16).save_pretrained(args.out)
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS,
        eos_token=EOS,
        pad_token=EOS,
        model_max_length=args.context,
    )
    hf_tok.save_pretrained(args.out)
    loaded = AutoModelForCausalLM.from_pretrained(
        args.out, dtype=torch.float32, local_files_only=True
    )
    held = {part: evaluate(loaded, data) for part, data in held_data.items()}
    if len(held_data) > 1:
        held["all"] = evaluate(loaded, torch.cat(list(held_data.values())))
    seen = evaluate(loaded, train_eval)
    for part, metrics in held.items():
        log(
            f"held-out {part}: cross-entropy {metrics['cross_entropy']:.4f} nats/token, entropy "
            f"mean {metrics['mean_entropy']:.4f} / median {metrics['median_entropy']:.4f} nats, "
            f"top-1 probability mean {metrics['mean_top1_prob']:.4f}, ≥ 0.9 at "
            f"{metrics['share_top1_ge_0.9']:.1%} of positions"
        )
    log(f"training windows: cross-entropy {seen['cross_entropy']:.4f}")

    prompts = prompts_from(
        [d for d in test_docs if not is_test(d[0])], tok, count=64, max_tokens=40
    )
    (args.out / "prompts.json").write_text(
        json.dumps(
            {
                "about": "first lines of top-level def/class statements in held-out stdlib files",
                "prompts": prompts,
            },
            indent=1,
            ensure_ascii=False,
        )
        + "\n",
        encoding="utf-8",
    )
    import tokenizers
    import transformers

    elapsed = time.time() - start
    record = {
        "command": " ".join(["python", "scripts/train_tiny_lm.py", *sys.argv[1:]]),
        "arguments": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "held_out": {
            part: {k: round(v, 4) for k, v in metrics.items()} for part, metrics in held.items()
        },
        "training_windows": {k: round(v, 4) for k, v in seen.items()},
        "held_out_tokens_evaluated": {
            part: int(data[:, 1:].numel()) for part, data in held_data.items()
        },
        "parameters": n_params,
        "corpus": {
            "training_documents": len(train_docs),
            "held_out_documents": len(test_docs),
            "training_tokens": len(train_ids),
            "held_out_tokens": len(test_ids),
            "tokens_seen": args.steps * args.batch_size * args.context,
        },
        "loss_curve": curve,
        "wall_time_s": round(elapsed, 1),
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
            "threads": args.threads,
        },
    }
    (args.out / "training.json").write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    log(f"wrote {args.out} in {elapsed:.0f} s")


if __name__ == "__main__":
    main()
