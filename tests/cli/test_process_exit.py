"""The console entry point ends the process with the command's status, its output flushed and
its exit handlers run, without the interpreter's teardown; the app alone (as the tests and an
embedding process call it) ends nothing."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from typer.testing import CliRunner

from gradlens.cli import app
from gradlens.cli.process_exit import exit_status

SCRIPT = textwrap.dedent(
    """
    import atexit, sys
    from gradlens.cli import main

    class Witness:  # finalized by the interpreter's teardown, when there is one
        def __del__(self, stderr=sys.stderr):  # bound now: teardown may have unset `sys`
            stderr.write("torn down\\n")

    witness = Witness()
    atexit.register(lambda: print("exit handler ran"))
    sys.argv = ["gradlens", *sys.argv[1:]]
    main()
    print("not reached")
    """
)


def run_main(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", SCRIPT, *args], capture_output=True, text=True, timeout=120
    )


@pytest.mark.slow  # a process of its own
def test_main_ends_the_process_after_the_command_without_teardown():
    done = run_main("losses")
    assert done.returncode == 0, done.stderr
    assert "reinforce" in done.stdout  # the command's output, flushed
    assert done.stdout.rstrip().endswith("exit handler ran")
    assert "not reached" not in done.stdout
    assert done.stderr == ""  # no teardown: nothing finalized, nothing reported at unload


@pytest.mark.slow  # a process of its own
def test_main_keeps_a_user_errors_status_and_message():
    done = run_main("compare", "--set", "source.vocab_size=-1")
    assert done.returncode == 2, done.stdout + done.stderr
    assert "source.vocab_size" in done.stderr and "torn down" not in done.stderr
    assert done.stdout.rstrip().endswith("exit handler ran")


BUG = "import gradlens.config\ngradlens.config.build_config = lambda *a, **k: 1 / 0\n"


@pytest.mark.slow  # a process of its own
@pytest.mark.parametrize("debug", [False, True])
def test_debug_keeps_the_status_and_adds_the_traceback(debug):
    # --debug shows the traceback, but the status stays the error's: 2 for the user's, 3 for a
    # bug (a ZeroDivisionError planted in the config builder), not Python's 1
    flag = ["--debug"] if debug else []
    user = run_main("compare", "--set", "source.vocab_size=-1", *flag)
    planted = subprocess.run(
        [sys.executable, "-c", BUG + SCRIPT, "compare", *flag],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert user.returncode == 2 and planted.returncode == 3, user.stderr + planted.stderr
    assert "source.vocab_size" in user.stderr and "ZeroDivisionError" in planted.stderr
    for done in (user, planted):
        assert ("Traceback" in done.stderr) is debug, done.stderr
        assert done.stdout.rstrip().endswith("exit handler ran")  # still ended by main


@pytest.mark.slow  # a process of its own
def test_the_same_script_without_main_is_torn_down():
    # the witness is real: the interpreter's teardown finalizes it when main does not end
    # the process first
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT.replace("main()", "pass")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0 and "torn down" in done.stderr


def test_the_app_in_process_ends_nothing():
    result = CliRunner().invoke(app, ["losses"])
    assert result.exit_code == 0, result.output  # and this test process goes on


@pytest.mark.parametrize(("code", "status"), [(None, 0), (0, 0), (2, 2), (3, 3), ("boom", 1)])
def test_the_status_is_the_one_sys_exit_gives(code, status):
    assert exit_status(code) == status
