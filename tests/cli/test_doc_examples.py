"""The command lines of README.md and the docs work in the order they are written.

Each document's ``gradlens ...`` lines (from the ```bash blocks named below; ``$`` prompts and
``\\`` continuations understood, output lines skipped) run through the CLI in-process, one after
the other, from the repository root, so a line may use a file an earlier line wrote. The
placeholders become real things: DIR (a checkpoint directory) the built-in model's directory,
``run/gradlens`` (the files of a hooked training run) the example run in docs/examples/trl_run,
``mypkg`` a package written to a temporary directory (``losses:my_loss`` a loss of your own,
``mod:fn`` PPO-clip in verl's signature), and every file a line writes or reads (``.png``,
``.json``, ``.csv``, ``.safetensors``, ``.pt``, ``.jsonl``) a file of that name in the temporary
directory, so that nothing in the repository is overwritten. Every line must exit 0, except
one whose comment ends in "(exit 1)": an example of a ``--check`` that fails on purpose, which
must exit 1 with a FAIL line.

Not run: the blocks of docs/batchfile.md that read a file from your trainer (``step_120``,
``ids.pt``) and docs/performance.md's benchmark commands.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

import gradlens
from gradlens.cli import app

REPO = Path(__file__).resolve().parents[2]
BUILTIN = Path(gradlens.__file__).resolve().parent / "data" / "tiny_lm"
FILE = re.compile(r"^[\w./-]+\.(png|json|csv|safetensors|pt|jsonl)$")
CHECKPOINTS = {"DIR", "/path/to/checkpoint"}
RUNS = {"run/gradlens"}  # a hooked run's folder: the example run the docs show

# (document, the heading whose ```bash blocks hold the examples; None: every block)
DOCUMENTS = [
    ("README.md", "## Using it"),
    ("docs/sweep.md", None),
    ("docs/model.md", None),
    ("docs/mismatch.md", None),
    ("docs/batchfile.md", "### A model-source batch, read back with its checkpoint"),
]

MYPKG = {
    "__init__.py": "",
    "losses.py": """
        def my_loss(logp, old_logp, advantages, mask):
            # REINFORCE, token mean
            return (-advantages * logp * mask).sum() / mask.sum()
    """,
    "mod.py": """
        import torch

        def fn(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean",
               config=None):
            # PPO-clip as verl writes it: the same loss as the built-in ppo_clip
            r = torch.exp(log_prob - old_log_prob)
            clipped = torch.clamp(r, 1 - config.clip_ratio_low, 1 + config.clip_ratio_high)
            surrogate = torch.maximum(-advantages * r, -advantages * clipped)
            return (surrogate * response_mask).sum() / response_mask.sum(), {}
    """,
}


def _section(text: str, heading: str | None) -> str:
    if heading is None:
        return text
    level = heading.split()[0]
    start = text.index(heading + "\n")
    rest = text[start + len(heading) :]
    end = re.search(rf"^#{{1,{len(level)}}} ", rest, re.MULTILINE)
    return rest[: end.start()] if end else rest


def command_lines(document: str, heading: str | None) -> list[str]:
    """The ``gradlens`` lines of the bash blocks under ``heading``, continuations joined, and
    the ``python tests/...`` lines that build what they read."""
    section = _section((REPO / document).read_text(), heading)
    lines: list[str] = []
    for block in re.findall(r"^```bash\n(.*?)^```", section, re.MULTILINE | re.DOTALL):
        pending = ""
        for raw in block.splitlines():
            line = pending + raw.strip().removeprefix("$ ")
            if line.endswith("\\"):
                pending = line[:-1] + " "
                continue
            pending = ""
            if line.startswith(("gradlens ", "python tests/")):
                lines.append(line)
    return lines


def _substitute(arg: str, tmp: Path) -> str:
    key, eq, value = arg.rpartition("=")
    if not eq:
        key, value = "", arg
    if value in CHECKPOINTS:
        value = str(BUILTIN)
    elif value in RUNS:
        value = str(REPO / "docs" / "examples" / "trl_run")
    elif FILE.match(value):
        value = str(tmp / Path(value).name)
    elif value and (tmp / value).is_dir():  # a folder an earlier line built (a checkpoint)
        value = str(tmp / value)
    return f"{key}{eq}{value}"


def run_in_order(lines: list[str], tmp: Path) -> None:
    runner = CliRunner()
    for line in lines:
        if line.startswith("python "):  # a helper script of the tests, run where the files go
            script, *args = shlex.split(line, comments=True)[1:]
            subprocess.run([sys.executable, str(REPO / script), *args], cwd=tmp, check=True)
            continue
        words = shlex.split(line, comments=True)[1:]
        target = None
        if ">" in words:
            at = words.index(">")
            target, words = tmp / Path(words[at + 1]).name, words[:at]
        argv = [_substitute(w, tmp) for w in words]
        result = runner.invoke(app, argv)
        if line.rstrip().endswith("(exit 1)"):  # a check shown failing on purpose
            assert result.exit_code == 1 and "FAIL" in result.output, f"{line}\n{result.output}"
            continue
        assert result.exit_code == 0, f"{line}\n{result.output}"
        if target is not None:
            target.write_text(result.stdout)


@pytest.fixture
def mypkg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    package = tmp_path / "pkgs" / "mypkg"
    package.mkdir(parents=True)
    for name, text in MYPKG.items():
        (package / name).write_text(textwrap.dedent(text))
    monkeypatch.syspath_prepend(str(package.parent))
    for name in [m for m in sys.modules if m == "mypkg" or m.startswith("mypkg.")]:
        monkeypatch.delitem(sys.modules, name)  # imported from this folder, forgotten after
    return package


def test_every_document_has_examples():
    for document, heading in DOCUMENTS:
        assert command_lines(document, heading), document


@pytest.mark.slow
@pytest.mark.parametrize("document, heading", DOCUMENTS, ids=[d for d, _ in DOCUMENTS])
def test_the_examples_run_in_the_order_written(document, heading, mypkg, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    run_in_order(command_lines(document, heading), tmp_path)
