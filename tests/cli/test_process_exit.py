"""The console entry point exits without the garbage collector's last sweep; the app alone
(as the tests and an embedding process call it) leaves the collector as it was."""

from __future__ import annotations

import gc
import subprocess
import sys
import textwrap

from typer.testing import CliRunner

from gradlens.cli import app

SCRIPT = textwrap.dedent(
    """
    import atexit, gc, sys
    from gradlens.cli import main

    # registered first, so it runs last: after main's freeze and the command's own handlers
    atexit.register(lambda: print(f"frozen at exit: {gc.get_freeze_count()}"))
    print(f"frozen before: {gc.get_freeze_count()}")
    sys.argv = ["gradlens", *sys.argv[1:]]
    main()
    """
)


def run_main(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", SCRIPT, *args], capture_output=True, text=True, timeout=120
    )


def test_main_freezes_the_heap_after_a_command_and_its_exit_status_stands():
    done = run_main("losses")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "frozen before: 0"
    assert "reinforce" in done.stdout  # the command ran and printed
    frozen = int(lines[-1].removeprefix("frozen at exit: "))
    assert frozen > 1000  # every live object: the modules, their functions and classes


def test_main_freezes_after_a_user_error_too_and_keeps_its_status():
    done = run_main("compare", "--set", "source.vocab_size=-1")
    assert done.returncode == 2, done.stdout + done.stderr
    assert "source.vocab_size" in done.stderr
    assert int(done.stdout.splitlines()[-1].removeprefix("frozen at exit: ")) > 1000


def test_the_app_in_process_leaves_the_collector_alone():
    before = gc.get_freeze_count()
    result = CliRunner().invoke(app, ["losses"])
    assert result.exit_code == 0, result.output
    assert gc.get_freeze_count() == before
