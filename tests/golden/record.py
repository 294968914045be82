"""Record the golden reports: ``python tests/golden/record.py [NAME ...]``.

Run it only to accept a deliberate change of the reports; say which fields changed, and
why, in docs/json-schema.md's changelog. On a CPU other than ``cases.BASE_PLATFORM`` the cases
of ``cases.PLATFORM_BOUND`` are written under ``platforms/<platform>/`` (their numbers depend
on the CPU's kernels, tests/cpu_kernels.py); record those from a commit whose tests reproduce
the base reports on the base platform, so that the two recordings are of the same code.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from typer.testing import CliRunner

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from cpu_kernels import kernel_probe, pin, platform  # noqa: E402

pin()  # the kernels the tests compute with (tests/cpu_kernels.py)

from cases import BASE_PLATFORM, PLATFORM_BOUND, cases  # noqa: E402

from gradlens.cli import app  # noqa: E402


def run_case(argv: list[str], setup: list[str] | None, tmp: Path) -> dict:
    runner = CliRunner()
    if setup is not None:
        done = runner.invoke(app, [a.replace("{tmp}", str(tmp)) for a in setup])
        assert done.exit_code == 0, done.output
    result = runner.invoke(app, [a.replace("{tmp}", str(tmp)) for a in argv])
    assert result.exit_code in (0, 1), result.output
    return json.loads(result.stdout)


def normalise(report: dict, tmp: str) -> dict:
    """The report with the case's temporary directory written as {tmp}."""
    return json.loads(json.dumps(report).replace(tmp, "{tmp}"))


PROBE = "kernel_probe.txt"  # in a platform's folder: the recording CPU's `kernel_probe`


def golden_file(name: str) -> Path:
    """Where the report of case ``name`` is recorded for this CPU."""
    here = platform()
    if name in PLATFORM_BOUND and here != BASE_PLATFORM:
        return HERE / "platforms" / here / f"{name}.json"
    return HERE / f"{name}.json"


def unrecorded(name: str) -> str | None:
    """Why this CPU has no recording of case ``name`` to compare with; None if it has one."""
    path = golden_file(name)
    if not path.exists():
        return f"no recording for this CPU ({platform()})"
    probe = path.parent / PROBE
    if probe.exists() and probe.read_text().strip() != kernel_probe():
        return (
            f"this CPU ({platform()}) rounds the probe's products otherwise than the one that "
            f"recorded {path.parent.name}'s reports (tests/cpu_kernels.py, kernel_probe)"
        )
    return None


def main(names: list[str]) -> None:
    for name, argv, _slow, setup in cases():
        if names and name not in names:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            report = normalise(run_case(argv, setup, Path(tmp)), tmp)
        path = golden_file(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=1, sort_keys=True) + "\n")
        if path.parent != HERE:
            (path.parent / PROBE).write_text(kernel_probe() + "\n")
        print("recorded", path.relative_to(HERE))


if __name__ == "__main__":
    main(sys.argv[1:])
