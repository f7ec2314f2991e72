"""Docs as tests: every command shown in a code block of README.md, docs/**/*.md and records/**/*.md
(``lopt ...``, ``python -m lopt...``, ``python scripts/...``, ``torchrun``/``accelerate launch ... -m
lopt ...``, ``make ...``) is one test, named by its file and line (``docs/rl.md:10``).

A command runs as written, in a scratch folder per doc file (later commands see what earlier ones
wrote), on a tiny Llama and the local data, made short by SUBSTITUTIONS below: ``--model`` -> the tiny
model, ``--max-steps N`` -> 1, user files such as ``prefs.jsonl`` -> small files of the right shape, and
so on. A command that needs the hub, several processes, a GPU or hours is checked without running
(``why_not_run`` names the reason): its arguments go through the real parser and, for the training
commands, the options are built and validated as a run would (``config.validate()``), so a flag that
no longer exists or a combination that stops at start-up fails here too.
"""
from __future__ import annotations

import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import SHARED_DATA, addition_rows, make_tiny_model, make_tokenizer, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md")), *sorted((ROOT / "records").rglob("*.md"))]
LAUNCHERS = ("torchrun", "accelerate")
TRAINERS = ("train", "demo", "grpo", "dpo")  # the commands built from an options dataclass

# Folders whose records are kept as they were written, naming code that was removed since: their
# non-`lopt` commands (make targets and modules of that time) are not checked; the folder's README must
# say it is frozen. Their `lopt` commands are still parsed and validated.
FROZEN = {"records/study-v1/": "study v1's code was removed; its RESULTS.md is kept as it was written"}


# --------------------------------------------------------------------------- reading the docs


@dataclass
class DocCommand:
    path: str  # relative to the repository root
    line: int  # where the command starts (1-based)
    text: str  # continuation lines joined, comments dropped

    @property
    def id(self) -> str:
        return f"{self.path}:{self.line}"

    @property
    def argv(self) -> list[str]:
        return [t for t in shlex.split(self.text) if t != "..."]  # "lopt train ... --eval-every 50": the rest

    @property
    def program(self) -> list[str]:
        """The command without leading VAR=value assignments."""
        argv = self.argv
        while argv and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=\S*", argv[0]):
            argv = argv[1:]
        if argv[:3] in (["python", "-m", "lopt"], ["python3", "-m", "lopt"]):  # the same as `lopt`
            argv = ["lopt", *argv[3:]]
        return argv


def _is_command(text: str) -> bool:
    try:
        argv = shlex.split(text, comments=True)
    except ValueError:
        return False
    while argv and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=\S*", argv[0]):
        argv = argv[1:]
    if len(argv) < 2:
        return False
    head, second = argv[0], argv[1]
    if head == "lopt":
        return not second.endswith(":")  # "lopt train: error: ..." is output shown in the docs
    if head in ("python", "python3"):
        return (second == "-m" and len(argv) > 2 and argv[2].split(".")[0] == "lopt") or second.startswith("scripts/")
    if head in LAUNCHERS:
        return "-m" in argv and argv[argv.index("-m") + 1:][:1] == ["lopt"]
    return head == "make"


def doc_commands(files=DOC_FILES, root: Path = ROOT) -> list[DocCommand]:
    """The commands in the code blocks (fenced, or indented by four spaces) of ``files``."""
    out = []
    for f in files:
        lines = f.read_text().splitlines()
        fence, prev_blank, i = None, True, 0
        while i < len(lines):
            raw = lines[i]
            stripped = raw.strip()
            if stripped.startswith(("```", "~~~")):
                fence = None if fence else stripped[:3]
                i += 1
                continue
            in_code = fence is not None or (raw.startswith("    ") and prev_blank)
            prev_blank = not stripped or (prev_blank and raw.startswith("    "))
            if not in_code:
                i += 1
                continue
            start, parts = i, [stripped]
            while parts[-1].endswith("\\") and i + 1 < len(lines):
                parts[-1] = parts[-1][:-1]
                i += 1
                parts.append(lines[i].strip())
            i += 1
            text = " ".join(parts)
            if _is_command(text):
                text = " ".join(shlex.quote(t) for t in shlex.split(text, comments=True))
                out.append(DocCommand(str(f.relative_to(root)), start + 1, text))
    return out


COMMANDS = doc_commands()

# --------------------------------------------------------------------------- what does not run, and why

HUB_DATA = {"metamathqa": "the hub's MetaMathQA", "alpaca": "the hub's Alpaca", "tulu3": "the hub's Tulu 3",
            "numinamath": "the hub's AI-MO/NuminaMath-TIR"}
MAKE_TARGETS = {"demo": "creates .venv and installs lopt first (minutes); `lopt demo` is the same run",
                "test": "the whole suite", "test-fast": "the suite without the slow tests",
                "test-gpu": "the CUDA checks", "test-faults": "the fault-injection suite (minutes)",
                "experiment": "study v3, lopt study with the project's settings (hours)", "install": "creates .venv"}


def _option(argv: list[str], name: str) -> str | None:
    for j, tok in enumerate(argv):
        if tok == name and j + 1 < len(argv):
            return argv[j + 1]
        if tok.startswith(name + "="):
            return tok.split("=", 1)[1]
    return None


def why_not_run(cmd: DocCommand) -> str | None:
    """None when the command runs in the test (made small); else why it is only parsed."""
    argv = cmd.program
    frozen = next((why for prefix, why in FROZEN.items() if cmd.path.startswith(prefix)), None)
    if frozen and argv[0] != "lopt":
        return f"frozen: {frozen}"
    if argv[0] in LAUNCHERS:
        n = _option(argv, "--nproc_per_node") or _option(argv, "--num_processes") or "several"
        return f"{n} processes on GPUs ({argv[0]}); tests/test_distributed.py runs each mode on CPU"
    if argv[0] == "make":
        return f"make {argv[1]}: {MAKE_TARGETS.get(argv[1], 'a make target')}"
    if argv[:3] == ["python", "-m", "lopt.recipes.experiment"]:
        return "study v3, lopt study with the project's settings: hours (its lopt study arguments are checked)"
    if argv[:3] == ["python", "-m", "lopt.recipes.study.v2"]:
        return "study v2: hours (tests/test_experiment.py and tests/test_study.py check it)"
    if argv[:3] == ["python", "-m", "lopt.bench.distbench"]:
        return "two processes per mode, 15 minutes (tests/test_distributed.py)"
    if argv[0] != "lopt" and argv[1] == "-m":
        return f"a measurement of its own ({argv[2]}): minutes"
    if argv[0] != "lopt":
        return "tests/test_scripts.py runs every script on small inputs"
    if argv[:2] == ["lopt", "study"]:
        return "a bench, a sweep and many runs (tests/test_study.py runs lopt study end to end on a tiny model)"
    if argv[:2] == ["lopt", "bench"]:
        return "each configuration in fresh processes, minutes (tests/test_bench.py runs the bench on a tiny model)"
    if "--resume" in argv:
        return "continues an earlier run's checkpoint (tests/test_checkpoints.py, test_grpo.py, test_dpo.py)"
    data = _option(argv, "--dataset") or _option(argv, "--task")
    if data in HUB_DATA:
        return f"hub data: {HUB_DATA[data]}"
    if data and re.fullmatch(r"[\w.-]+/[\w.-]+", data) and not Path(data).suffix and not data.startswith("."):
        return f"hub data: {data}"
    if cmd.path.startswith("records/"):
        return "a recorded run (minutes to hours on 2 CPU cores); its options are parsed and validated"
    return None


# --------------------------------------------------------------------------- running one, made small


def _pref_rows(n: int = 12) -> list[dict]:
    return [{"prompt": f"What is {a} + 2?", "chosen": f"{a} + 2 = {a + 2}\n#### {a + 2}",
             "rejected": f"{a} + 2 = {a + 3}\n#### {a + 3}"} for a in range(n)]


# The files the docs name as the user's own, by (command, option): a small one of the right shape.
USER_FILES = {
    ("train", "--dataset"): addition_rows, ("demo", "--dataset"): addition_rows,
    ("train", "--eval-dataset"): addition_rows, ("grpo", "--task"): addition_rows,
    ("grpo", "--eval-dataset"): addition_rows, ("dpo", "--dataset"): _pref_rows,
    ("dpo", "--eval-dataset"): _pref_rows,
}
REWARD_MODULE = "def my_reward(completions, answer, **kwargs):\n    return [0.5 for _ in completions]\n"
RUN_YAML = "batch_size: 2\nwarmup_ratio: 0.0\n"

# How a documented command is made small: option -> its value in the test (not for plan and compare,
# which are fast as written). What a command lacks is added where ADDED says; --model, --base, --limit,
# data paths, --reward modules and --config files are handled in small_argv.
SUBSTITUTIONS = {
    "--max-steps": "1", "--save-every": "1", "--eval-every": "1", "--eval-limit": "2",
    "--max-completion-length": "8", "--max-length": "96", "--max-new-tokens": "16", "--kl-new-tokens": "8",
}
EVAL_LIMIT = "2"  # lopt eval --limit
_SMALL_RUN = [("--max-steps", "1"), ("--no-progress", None), ("--device", "cpu")]
ADDED = {
    "train": [*_SMALL_RUN, ("--max-length", "96"), ("--limit", "40")],
    "demo": [*_SMALL_RUN, ("--max-length", "96")],
    "grpo": [*_SMALL_RUN, ("--max-completion-length", "8"), ("--limit", "40")],
    "dpo": [*_SMALL_RUN, ("--max-length", "96"), ("--limit", "40"), ("--eval-limit", "2")],
    "eval": [("--limit", EVAL_LIMIT), ("--max-new-tokens", "16"), ("--kl-new-tokens", "8"), ("--no-progress", None)],
}
# Commands that compare runs the docs made elsewhere: what the test runs first, in the same folder.
SETUP = {"lopt compare runs/demo runs/e2e": ["lopt eval --model runs/e2e --base embedded --task task-loss:arithmetic"]}


class Workspace:
    """The scratch folder of one doc file, with the tiny models; remembers which commands ran."""

    def __init__(self, root: Path, models: dict[str, Path]):
        self.root, self.models, self.done = root, models, set()
        root.mkdir(parents=True, exist_ok=True)

    def model_dir(self, value: str) -> str:
        """A run directory the docs name (runs/gsm8k): the run's output when an earlier command made it,
        else a copy of the tiny model; any other model (a hub id, an alias, embedded) -> the tiny model."""
        if value.startswith(("runs/", "/tmp/")):
            target = self.root / value.lstrip("/")
            if not (target / "config.json").is_file():
                save_model(target, seed=2)
            return str(target)
        return str(self.models["tiny"])

    def path(self, value: str) -> str:
        if value.startswith("../shared/data"):
            return str(SHARED_DATA / value[len("../shared/data"):].lstrip("/"))
        if value.startswith("/tmp/"):
            return str(self.root / value.lstrip("/"))
        return value

    def user_file(self, command: str, option: str, value: str) -> str:
        value = self.path(value)
        if ":" in value and value.split(":", 1)[0] == "synthetic-gsm8k":
            return "synthetic-gsm8k:" + self.path(value.split(":", 1)[1])
        target = self.root / value
        make = USER_FILES.get((command, option))
        if make and value.endswith((".jsonl", ".json")) and not Path(value).is_absolute() and not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            write_jsonl(target, make())
        return value


def save_model(d: Path, seed: int) -> Path:
    model = make_tiny_model("llama", tie=True, seed=seed)
    model.config.max_position_embeddings = 2048  # rotary: any length; lets eval's defaults fit
    model.save_pretrained(d)
    make_tokenizer().save_pretrained(d)
    return d


def small_argv(cmd: DocCommand, ws: Workspace) -> list[str]:
    """The command's arguments (after ``lopt``) with SUBSTITUTIONS applied and ADDED appended."""
    argv = cmd.program
    sub = argv[1]
    out = [sub]
    rest = argv[2:]
    j = 0
    while j < len(rest):
        tok = rest[j]
        value = rest[j + 1] if j + 1 < len(rest) else None
        if tok in ("--model", "--base") and value is not None and sub != "plan":
            out += [tok, ws.model_dir(value) if tok == "--model" or value.startswith("runs/")
                    else str(ws.models["base"])]
            j += 2
            continue
        if tok == "--limit" and value is not None:
            out += [tok, EVAL_LIMIT if sub == "eval" else str(min(int(value), 40))]
            j += 2
            continue
        if tok in SUBSTITUTIONS and value is not None and sub not in ("plan", "compare"):
            out += [tok, SUBSTITUTIONS[tok]]
            j += 2
            continue
        if tok in ("--dataset", "--task", "--eval-dataset") and value is not None:
            out += [tok, ws.user_file(sub, tok, value)]
            j += 2
            continue
        if tok == "--reward" and value is not None and ":" in value and not Path(value.split(":")[0]).exists():
            module = value.split(":")[0]
            target = ws.root / (module.replace(".", "/") + ".py")
            target.parent.mkdir(parents=True, exist_ok=True)
            for parent in target.relative_to(ws.root).parents:
                if str(parent) != ".":
                    (ws.root / parent / "__init__.py").touch()
            target.write_text(REWARD_MODULE)
            out += [tok, value]
            j += 2
            continue
        if tok == "--config" and value is not None:
            if not (ws.root / value).exists():
                (ws.root / value).write_text(RUN_YAML)
            out += [tok, value]
            j += 2
            continue
        out.append(ws.path(tok))
        j += 1
    if sub in TRAINERS + ("eval",) and "--model" not in out:
        out += ["--model", str(ws.models["tiny"])]
    for flag, value in ADDED.get(sub, []):
        if flag not in out:
            out += [flag] if value is None else [flag, value]
    return out


# Further checks of what a command printed, for the defects these tests were written against.
def _grpo_batch_line(ws: Workspace, out: str, err: str) -> None:
    assert "lopt grpo: --batch-size 8 (one group of --num-generations 8 completions per micro-batch" in err, err


def _compare_shows_the_change(ws: Workspace, out: str, err: str) -> None:
    assert "deltas are against base" in out, out
    assert "retention change, tuned vs base (paired over the same items)" in out, out


CHECKS = {"lopt grpo --task gsm8k --method lopt --max-steps 200 --num-generations 8": _grpo_batch_line,
          "lopt compare base.json tuned.json": _compare_shows_the_change}


# --------------------------------------------------------------------------- the tests


@pytest.fixture(scope="session")
def doc_workspaces(tmp_path_factory):
    root = tmp_path_factory.mktemp("docs")
    models = {"tiny": save_model(root / "tiny", seed=0), "base": save_model(root / "base", seed=1)}
    cache: dict[str, Workspace] = {}

    def get(path: str) -> Workspace:
        if path not in cache:
            cache[path] = Workspace(root / "runs" / path.replace("/", "_"), models)
        return cache[path]

    return get


def _load_script(path: Path):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"lopt_doc_script_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_small(cmd: DocCommand, ws: Workspace, capsys) -> tuple[str, str]:
    """Run ``cmd`` made small in its workspace; returns (stdout, stderr); fails on a non-zero exit."""
    from lopt.cli import main

    capsys.readouterr()
    small = small_argv(cmd, ws)
    rc = main(small)
    out, err = capsys.readouterr()
    assert rc == 0, f"{cmd.id}: `{cmd.text}` (run as `{shlex.join(small)}`) exited {rc}:\n{err[-3000:]}"
    return out, err


def check_parses(cmd: DocCommand, reason: str) -> None:
    """The checks of a command that does not run: the real parser, and for the training commands the
    options built and validated as a run would."""
    argv = cmd.program
    if reason.startswith("frozen"):
        folder = ROOT / next(p for p in FROZEN if cmd.path.startswith(p))
        assert "frozen" in (folder / "README.md").read_text()
        return
    if argv[0] in LAUNCHERS:
        return check_lopt(argv[argv.index("-m") + 2:], cmd)
    if argv[0] == "make":
        makefile = (ROOT / "Makefile").read_text()
        for target in [a for a in argv[1:] if "=" not in a]:
            assert re.search(rf"^{re.escape(target)}:", makefile, re.M), f"{cmd.id}: no make target {target}"
        return
    if argv[0] == "lopt":
        return check_lopt(argv[1:], cmd)
    if argv[2:3] == ["lopt.recipes.experiment"]:  # it runs lopt study in a child: check those arguments
        from lopt.recipes.experiment import study_args

        return check_lopt(["study", *study_args(argv[3:])[0]], cmd)
    if argv[1] == "-m":
        import importlib

        main = importlib.import_module(argv[2]).main
    else:  # python scripts/NAME.py
        main = _load_script(ROOT / argv[1]).main
    ns = parsed_by(main, argv[3:] if argv[1] == "-m" else argv[2:], cmd)
    if argv[2:3] == ["lopt.recipes.study.v2"]:
        from lopt.recipes.study import plan

        names = list(plan.configs())
        known = {"base", "bench", *names, *(r for r, _, _ in plan.runs(names, plan.V2))}
        unknown = [n for n in ns.only or [] if n not in known]
        assert not unknown, f"{cmd.id}: unknown study runs {unknown}"
    if argv[2:3] == ["lopt.bench.distbench"]:
        from lopt.bench.distbench import MODES

        for m in ns.modes:
            mode, _, opts = m.partition(":")
            keys = {o.split("=", 1)[0] for o in opts.split(",") if o}
            assert mode in MODES and keys <= {"b", "mb", "gc", "sel"}, f"{cmd.id}: unknown distbench mode {m}"


class _Parsed(Exception):
    """Raised right after a module's main parsed its arguments, before it starts the real work."""


def parsed_by(main, argv: list[str], cmd: DocCommand):
    """The namespace ``main(argv)`` parses its arguments into; nothing after the parse runs."""
    import argparse

    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        raise _Parsed(original(self, args, namespace))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
        try:
            main(argv)
        except _Parsed as e:
            return e.args[0]
        except SystemExit as e:
            pytest.fail(f"{cmd.id}: `{cmd.text}` does not parse (exit {e.code}); see the output above")
    pytest.fail(f"{cmd.id}: {main.__module__}.main returned without parsing its arguments")


def check_lopt(argv: list[str], cmd: DocCommand) -> None:
    from lopt.bench.peer import PEER_CONFIGS
    from lopt.bench.runner import CONFIGS
    from lopt.cli import DEMO_DEFAULTS, build_parser, config_from_args
    from lopt.recipes.dpo import DPORunConfig
    from lopt.recipes.grpo import GRPORunConfig
    from lopt.recipes.sft import TrainConfig

    try:
        ns = build_parser().parse_args(argv)
    except SystemExit as e:
        pytest.fail(f"{cmd.id}: `{cmd.text}` does not parse (exit {e.code}); see the output above")
    assert ns.command == argv[0]
    if ns.command in TRAINERS and not getattr(ns, "resume", None):
        cls = {"train": TrainConfig, "demo": TrainConfig, "grpo": GRPORunConfig, "dpo": DPORunConfig}[ns.command]
        cfg = config_from_args(ns, cls, DEMO_DEFAULTS if ns.command == "demo" else None, command=ns.command)
        cfg.validate()  # what a run checks before it loads anything
    if ns.command == "study":  # the checks a study makes before it reads any data
        from lopt.recipes.study.command import StudyOptions, check_options

        check_options(config_from_args(ns, StudyOptions, command="study"))
    if ns.command == "bench":
        unknown = [c for c in ns.configs if c not in CONFIGS and c not in PEER_CONFIGS]
        assert not unknown, f"{cmd.id}: unknown bench configurations {unknown}"


@pytest.mark.parametrize("cmd", COMMANDS, ids=[c.id for c in COMMANDS])
def test_doc_command(cmd: DocCommand, doc_workspaces, monkeypatch, capsys, record_property):
    """A documented command runs (made small), or, where it cannot here, parses and validates."""
    reason = why_not_run(cmd)
    record_property("parse_only", reason or "")
    if reason is not None:
        check_parses(cmd, reason)
        return
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(sys, "path", list(sys.path))  # a --reward module imported from the folder
    modules = set(sys.modules)
    ws = doc_workspaces(cmd.path)
    monkeypatch.chdir(ws.root)
    try:
        # What the docs ran before this command, in the same file, runs first (once): its outputs are
        # this command's inputs (a trained run, an eval JSON).
        earlier = [c for c in COMMANDS if c.path == cmd.path and c.line < cmd.line and why_not_run(c) is None]
        setup = [DocCommand(cmd.path, 0, t) for k, ts in SETUP.items() if cmd.text.startswith(k) for t in ts]
        for c in earlier + setup:
            if c.id not in ws.done or c.line == 0:
                run_small(c, ws, capsys)
                ws.done.add(c.id)
        out, err = run_small(cmd, ws, capsys)
        ws.done.add(cmd.id)
        for prefix, check in CHECKS.items():
            if cmd.text.startswith(prefix):
                check(ws, out, err)
    finally:
        for name in set(sys.modules) - modules:
            if str(ws.root) in str(getattr(sys.modules[name], "__file__", "") or ""):
                del sys.modules[name]


def test_every_lopt_command_is_documented():
    """At least one documented command (so one test above) per `lopt` command."""
    from lopt.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    documented = set()
    for c in COMMANDS:
        argv = c.program
        if argv[0] == "lopt":
            documented.add(argv[1])
        elif argv[0] in LAUNCHERS:
            documented.add(argv[argv.index("-m") + 2])
    assert set(sub.choices) <= documented, f"no documented command for {sorted(set(sub.choices) - documented)}"
    ran = {c.program[1] for c in COMMANDS if c.program[0] == "lopt" and why_not_run(c) is None}
    assert {"train", "demo", "grpo", "dpo", "eval", "compare", "plan"} <= ran  # bench: parse only (processes)


def test_the_reader_finds_commands_and_skips_output(tmp_path):
    md = tmp_path / "x.md"
    md.write_text("text `lopt train --inline` is not a block\n\n```bash\n# a comment\n"
                  "lopt train --max-steps 2 \\\n    --lr 1e-4   # trailing comment\n"
                  "pip install -e .\nOMP_NUM_THREADS=1 python -m lopt.bench.distbench --steps 1\n```\n\n"
                  "```\nlopt train: error: something\nlopt: skipping OUT/checkpoint-6\n```\n\n"
                  "made by\n\n    torchrun --nproc_per_node 2 -m lopt train --pipeline\n")
    cmds = [(c.line, c.text) for c in doc_commands([md], tmp_path)]
    assert cmds == [(5, "lopt train --max-steps 2 --lr 1e-4"),
                    (8, "OMP_NUM_THREADS=1 python -m lopt.bench.distbench --steps 1"),
                    (18, "torchrun --nproc_per_node 2 -m lopt train --pipeline")]
    assert [c.id for c in doc_commands([md], tmp_path)][0] == "x.md:5"


def test_demo_help_shows_the_demos_defaults(capsys):
    from lopt.cli import DEMO_DEFAULTS, main

    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name in ("max_steps", "batch_size", "output_dir", "warmup_ratio"):
        assert f"(default: {DEMO_DEFAULTS[name]})" in text, name
    assert "(default: 4)" not in text.split("--batch-size BATCH_SIZE", 1)[1][:80]  # train's, not the demo's


def test_grpo_batch_size_follows_num_generations(capsys):
    from lopt.cli import main
    from lopt.recipes.grpo import GRPORunConfig

    assert GRPORunConfig(num_generations=8).batch_size == 8 and GRPORunConfig().batch_size == 4
    assert GRPORunConfig(num_generations=8, batch_size=4, grad_accum=2).batch_size == 4
    GRPORunConfig(num_generations=6).validate()  # the default batch works for any group size
    assert main(["grpo", "--print-config", "--num-generations", "8"]) == 0
    assert "\nbatch_size: 8\n" in capsys.readouterr().out


def test_the_tables_name_documented_commands():
    """A check or a setup whose command left the docs would silently check nothing."""
    texts = [c.text for c in COMMANDS]
    for prefix in [*CHECKS, *SETUP]:
        assert any(t.startswith(prefix) for t in texts), f"no documented command starts with {prefix!r}"
