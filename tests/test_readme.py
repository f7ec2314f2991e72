"""README.md is the front page: small, in the field's order, and its quick starts run as written."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import torch

from conftest import make_tiny_model, make_tokenizer

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def _section(text: str, heading: str) -> str:
    return text.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]


def _code(section: str, lang: str) -> str:
    blocks = re.findall(rf"```{lang}\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, f"expected one ```{lang} block"
    return blocks[0]


def test_the_readme_is_a_front_page():
    text = README.read_text()
    assert len(text.encode()) < 12_000
    assert 100 <= text.count("\n") <= 170
    assert "make demo" in text and "make test" in text and "pip install -e ." in text
    for extra in ("plot", "tensorboard", "eval", "math"):
        assert f"  {extra}:" in text  # each optional extra, with what it is for
    headings = re.findall(r"^## (.+)$", text, flags=re.M)
    assert headings == ["Install", "Quick start: command line", "Quick start: Python", "Which method when",
                        "What it costs", "Guides"]
    assert "```\n input ids" in text  # the picture comes before everything else
    # study v3's block, made by its reporter (tests/test_experiment.py checks it against the records)
    from lopt.recipes.study.summary import readme_markers

    which = _section(text, "Which method when")
    start, end = readme_markers(ROOT / "records" / "study-v3", ROOT)
    assert which.count(start) == 1 and which.count(end) == 1
    table = [ln for ln in which.split(start, 1)[1].splitlines() if ln.startswith("|")]
    assert table[0].startswith("| method | KL at 1x") and table[2].startswith("| e2e |")
    for link in re.findall(r"\]\(((?:docs|records)/[^)#]+)", text):
        assert (ROOT / link).exists(), link


def test_the_cli_quick_start_parses():
    from lopt.cli import build_parser

    commands = [ln.split("#", 1)[0].strip() for ln in _code(_section(README.read_text(), "Quick start: command line"),
                                                            "bash").splitlines()]
    commands = [c for c in commands if c]
    assert commands and all(c.startswith("lopt ") for c in commands)
    parser = build_parser()
    for line in commands:
        ns = parser.parse_args(shlex.split(line)[1:])
        assert ns.command == shlex.split(line)[1]


def test_the_python_quick_start_runs_as_written(monkeypatch, tmp_path):
    """The README's code, with only the model loading answered by a tiny model and 100 steps cut to 6
    (two of them open the boundary): the upper and lower halves train, and the saved checkpoint loads
    with plain transformers and computes what the trained model computes."""
    import transformers

    import lopt

    code = _code(_section(README.read_text(), "Quick start: Python"), "python")
    assert "wrapped.begin_step(step" in code and "open_boundary" not in code
    assert code.count("range(100)") == 1
    code = code.replace("range(100)", "range(6)")

    load_model = transformers.AutoModelForCausalLM.from_pretrained
    model = make_tiny_model("llama", tie=True)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: model)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: make_tokenizer())
    opened = []  # what begin_step left the boundary at, step by step
    original = lopt.LoPTModel.begin_step

    def begin_step(self, step, *args, **kwargs):
        original(self, step, *args, **kwargs)
        opened.append(self.open_boundary)

    monkeypatch.setattr(lopt.LoPTModel, "begin_step", begin_step)
    monkeypatch.chdir(tmp_path)
    scope: dict = {"__name__": "readme_quick_start"}
    exec(compile(code, str(README), "exec"), scope)

    wrapped = scope["wrapped"]
    after = model.state_dict()
    layers = model.config.num_hidden_layers
    lower = "model.layers.0.mlp.down_proj.weight"
    upper = f"model.layers.{layers - 1}.mlp.down_proj.weight"
    assert not torch.equal(before[upper], after[upper])  # the task loss trained the last block
    assert not torch.equal(before[lower], after[lower])  # the open steps (0, 4) reached the lower half
    assert opened == [True, False, False, False, True, False]  # task_grad_every=4, through begin_step

    saved = load_model(tmp_path / "out")
    assert type(saved).__name__ == type(model).__name__
    ids = torch.randint(0, model.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(1))
    model.eval()
    with torch.no_grad():
        assert torch.allclose(saved(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5)
    assert not any("local" in k or "head_copy" in k for k in saved.state_dict())
