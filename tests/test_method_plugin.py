"""A new method is one file: tests/plugins/toy_method.py, installed as a plugin (entry-point group
``lopt.methods``), gets its option as a flag and a YAML key, trains through ``lopt train`` and is
costed by ``lopt plan`` from what it says it trains, with no edit to lopt itself.

It runs in a subprocess: registering a method changes ``LoPTConfig`` for the whole process."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import addition_rows, save_tiny, write_jsonl

PLUGINS = Path(__file__).parent / "plugins"

SCRIPT = r"""
import json, sys
from dataclasses import fields
import torch
from transformers import AutoModelForCausalLM
import lopt
from lopt.cli import build_parser, main
from lopt.plan import plan

tiny, data, out = sys.argv[1:4]
result = {"methods": list(lopt.METHODS), "fields": [f.name for f in fields(lopt.LoPTConfig)],
          "help": build_parser().parse_known_args(["train"])[0] is not None}
import io, contextlib
buf = io.StringIO()
with contextlib.redirect_stdout(buf):
    try:
        main(["train", "--help"])
    except SystemExit:
        pass
result["help"] = buf.getvalue()
base = AutoModelForCausalLM.from_pretrained(tiny)
rc = main(["train", "--model", tiny, "--dataset", data, "--output-dir", out, "--method", "toy", "--toy-layers", "1",
           "--max-steps", "2", "--batch-size", "4", "--lr", "1e-2", "--no-progress"])
tuned = AutoModelForCausalLM.from_pretrained(out)
changed = sorted(n for (n, a), (_, b) in zip(base.named_parameters(), tuned.named_parameters()) if not torch.equal(a, b))
wrapped = lopt.wrap(AutoModelForCausalLM.from_pretrained(tiny), method="toy", toy_layers=1)
trainable = sum(p.numel() for p in {id(p): p for p in wrapped.parameters() if p.requires_grad}.values())
row = plan(tiny, batch_size=2, max_length=16, precision="fp32", methods=["toy"], gradient_checkpointing="off")[0]
result.update(rc=rc, changed=changed, trainable=trainable, planned=row.trainable_params, row=row.method,
              run=json.loads(open(out + "/lopt_run.json").read())["options"]["toy_layers"])
print("RESULT " + json.dumps(result))
"""


def installed_plugin(site: Path, name: str, module: str) -> Path:
    """A folder that, on PYTHONPATH, looks like an installed package registering ``module`` under the
    entry-point group ``lopt.methods``."""
    dist = site / f"lopt_{name}_plugin-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: lopt-{name}-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[lopt.methods]\n{name} = {module}\n")
    return site


def test_a_method_in_one_file_trains_and_plans(tmp_path):
    site = installed_plugin(tmp_path / "site", "toy", "toy_method")
    tiny = save_tiny(tmp_path / "tiny")
    data = write_jsonl(tmp_path / "qa.jsonl", addition_rows())
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(PLUGINS), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tiny), str(data), str(tmp_path / "out")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    r = json.loads(line[len("RESULT "):])
    assert "toy" in r["methods"] and "toy_layers" in r["fields"]
    assert "--toy-layers" in r["help"] and "method: toy" in r["help"]
    assert r["rc"] == 0 and r["run"] == 1
    # Only the top layer (of 4), the final norm and the LM head moved; the tied head is the embedding.
    assert r["changed"] and all(n.startswith(("model.layers.3.", "model.norm.", "lm_head.", "model.embed_tokens."))
                                for n in r["changed"]), r["changed"]
    assert any(n.startswith("model.layers.3.") for n in r["changed"])
    assert r["row"] == "toy" and r["planned"] == r["trainable"]


def test_a_broken_plugin_is_named_and_skipped(tmp_path):
    site = installed_plugin(tmp_path / "site", "broken", "no_such_module_here")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-W", "always", "-c", "import lopt; print(lopt.METHODS)"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "'broken'" in proc.stderr and "no_such_module_here" in proc.stderr
    assert "lopt" in proc.stdout and "broken" not in proc.stdout
