"""A launcher's worker (torchrun sets WORLD_SIZE) ends through ``lopt.parallel.context.exit_worker``:
the command's exit status, its output and Python's exit handlers survive skipping the C++ teardown."""
import os
import subprocess
import sys
from pathlib import Path

SRC = str(Path(__file__).resolve().parents[1] / "src")

PROGRAM = """
import atexit, sys
atexit.register(lambda: print("atexit handler ran", flush=True))
sys.argv = ["lopt", *sys.argv[1:]]
from lopt.cli import main
sys.exit(main())
"""


def _run_as_worker(*args: str, world_size: str = "2") -> subprocess.CompletedProcess:
    env = dict(os.environ, WORLD_SIZE=world_size, PYTHONPATH=os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-c", PROGRAM, *args], capture_output=True, text=True, env=env,
                          timeout=120)


def test_a_worker_keeps_its_output_exit_handlers_and_status():
    bad = _run_as_worker("plan", "--model", "no-such-model-alias-xyz")
    assert bad.returncode == 2, bad.stderr[-2000:]
    assert "lopt plan: error:" in bad.stderr and "atexit handler ran" in bad.stdout


def test_main_called_with_arguments_returns_instead_of_exiting(monkeypatch, capsys):
    from lopt.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["train", "--print-config"]) == 0  # in-process callers (tests, notebooks) get the status back
    assert "max_steps:" in capsys.readouterr().out
