"""lopt plan --nproc N --parallel ddp|fsdp|pipeline: per-rank predictions against real 2-process gloo
steps on CPU (tests/plan_dist_worker.py, one torchrun launch), and one-line errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lopt.plan import PlanError, plan_parallel

HERE = Path(__file__).resolve().parent
B, T = 2, 24  # rows per rank, tokens


def size(name: str) -> dict:
    """Two tiny Llama shapes: every term distinct (head_dim * heads != hidden, kv heads < heads)."""
    if name == "a":
        return dict(model_type="llama", vocab_size=300, hidden_size=48, intermediate_size=72, num_hidden_layers=4,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=10, max_position_embeddings=256,
                    tie_word_embeddings=False)
    return dict(model_type="llama", vocab_size=512, hidden_size=96, intermediate_size=160, num_hidden_layers=6,
                num_attention_heads=4, num_key_value_heads=2, head_dim=20, max_position_embeddings=256,
                tie_word_embeddings=True)


# (name in the plan, lopt train options)
CONFIGS = {"e2e": {"method": "e2e"}, "lopt": {"method": "lopt"}, "freeze-lower": {"method": "freeze-lower"}}


def measure(root: Path) -> list[dict]:
    """Every job of the validation on 2 gloo processes (tests/plan_dist_worker.py): per rank, per job."""
    jobs = [{"name": f"{s}/{c}/{par}", "model": size(s), "train": dict(opts, fsdp=par == "fsdp"), "batch": B, "seq": T}
            for s in ("a", "b") for c, opts in CONFIGS.items() for par in ("ddp", "fsdp")]
    (root / "jobs.json").write_text(json.dumps(jobs))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(HERE.parent / "src"),
                                                                             os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(HERE / "plan_dist_worker.py"), str(root / "jobs.json"), str(root / "out.json")],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((root / "out.json").read_text())


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    return measure(tmp_path_factory.mktemp("plan-dist"))


def predicted(s: str, c: str, par: str):
    name = "lopt" if c == "lopt" else c
    rows = plan_parallel(size(s), nproc=2, parallel=par, batch_size=B, max_length=T, precision="fp32",
                         methods=[name], gradient_checkpointing="off")
    return rows[0]


@pytest.mark.parametrize("s", ["a", "b"])
@pytest.mark.parametrize("c", list(CONFIGS))
def test_ddp_per_rank(measured, s, c):
    row = predicted(s, c, "ddp")
    for rank in measured:
        m = rank[f"{s}/{c}/ddp"]
        assert m["resident"] == pytest.approx(row.weights + row.optimizer, rel=0.01)
        assert row.saved_visible == pytest.approx(m["saved"], rel=0.10)
        # the whole-step peak: resident state plus the live peak above it
        assert m["missed_frees"] == 0
        assert row.peak == pytest.approx(m["resident"] + m["live"], rel=0.15)
        assert row.peak - row.weights - row.optimizer == pytest.approx(m["live"], rel=0.15)


@pytest.mark.parametrize("s", ["a", "b"])
@pytest.mark.parametrize("c", list(CONFIGS))
def test_fsdp_per_rank(measured, s, c):
    row = predicted(s, c, "fsdp")
    for rank in measured:
        m = rank[f"{s}/{c}/fsdp"]
        assert m["resident"] == pytest.approx(row.weights + row.optimizer, rel=0.01)  # 1/N shards
        assert row.saved_visible == pytest.approx(m["saved"], rel=0.10)
        assert m["missed_frees"] == 0  # every free seen (plan_dist_worker.settle_collectives)
        # the whole-step peak: sharded state plus the live peak above it (unsharded units, buffers)
        assert row.peak == pytest.approx(m["resident"] + m["live"], rel=0.15)


def test_per_rank_arithmetic():
    cfg = size("a")
    one = plan_parallel(cfg, nproc=1, parallel="ddp", batch_size=B, max_length=T, methods=["e2e"],
                        gradient_checkpointing="off")[0]
    ddp = plan_parallel(cfg, nproc=4, parallel="ddp", batch_size=B, max_length=T, methods=["e2e"],
                        gradient_checkpointing="off")[0]
    fsdp = plan_parallel(cfg, nproc=4, parallel="fsdp", batch_size=B, max_length=T, methods=["e2e"],
                         gradient_checkpointing="off")[0]
    # a full replica, plus the gradient-sync buffer (which raises the peak only where the sync point is it)
    assert ddp.weights == one.weights and ddp.peak >= one.peak and ddp.details["comm"] > 0
    assert ddp.details["global_batch"] == 4 * B
    assert fsdp.weights * 4 == pytest.approx(one.weights, rel=0.01) and fsdp.activations == one.activations
    stages = plan_parallel(cfg, nproc=2, parallel="pipeline", batch_size=B, max_length=T, gradient_checkpointing="off")
    assert [r.details["rank"] for r in stages] == [0, 1] and stages[0].details["global_batch"] == B
    assert sum(r.trainable_params for r in stages) == plan_parallel(
        cfg, nproc=1, parallel="ddp", batch_size=B, max_length=T, methods=["lopt-k2"],
        gradient_checkpointing="off")[0].trainable_params


@pytest.mark.parametrize("kw,match", [
    (dict(nproc=0, parallel="ddp"), "--nproc must be >= 1"),
    (dict(nproc=3, parallel="pipeline", methods=["lopt-k2"]), "one block per process: 2 blocks but --nproc 3"),
    (dict(nproc=2, parallel="pipeline", methods=["e2e"]), "needs --method lopt"),
    (dict(nproc=2, parallel="fsdp", methods=["lisa"]), "refuses it"),
    (dict(nproc=2, parallel="fsdp", methods=["badam"]), "refuses it"),
    (dict(nproc=2, parallel="fsdp", methods=["lora"]), "refuses it"),
    (dict(nproc=2, parallel="mesh"), "--parallel must be one of"),
    (dict(nproc=2, parallel="fsdp", precision="bf16-true"), "bf16-true is not supported with --parallel fsdp"),
])
def test_bad_input_is_one_line(kw, match):
    with pytest.raises(PlanError, match=match) as e:
        plan_parallel(size("a"), batch_size=B, max_length=T, **kw)
    assert "\n" not in str(e.value)


def test_cli(capsys, tmp_path):
    from lopt.cli import main

    (tmp_path / "config.json").write_text(json.dumps(size("a")))
    assert main(["plan", "--model", str(tmp_path), "--batch-size", "2", "--max-length", "24", "--nproc", "2",
                 "--parallel", "fsdp", "--method", "e2e", "--gradient-checkpointing", "off", "--json", "-"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["parallel"] == "fsdp" and data["global_batch"] == 4 and data["rows"][0]["details"]["rank"] == "all"
    assert main(["plan", "--model", str(tmp_path), "--nproc", "0", "--parallel", "ddp"]) != 0
    err = capsys.readouterr().err.strip()
    assert "--nproc must be >= 1" in err and "\n" not in err


def table(out: list[dict]) -> str:
    """docs/plan-validation.md's table: prediction against each rank's measurement."""
    lines = ["| size | config | parallel | saved act. KiB pred / meas (rank 0, rank 1) | step peak KiB pred / meas "
             "(rank 0, rank 1) | pred / meas |", "|---|---|---|---|---|---|"]
    for s in ("a", "b"):
        for c in CONFIGS:
            for par in ("ddp", "fsdp"):
                r = predicted(s, c, par)
                m = [rank[f"{s}/{c}/{par}"] for rank in out]
                peaks = [x["resident"] + x["live"] for x in m]
                lines.append(f"| {s} | {r.method} | {par} | {r.saved_visible / 1024:.1f} / {m[0]['saved'] / 1024:.1f}, "
                             f"{m[1]['saved'] / 1024:.1f} | {r.peak / 1024:.1f} / {peaks[0] / 1024:.1f}, "
                             f"{peaks[1] / 1024:.1f} | {r.peak / max(peaks):.3f}-{r.peak / min(peaks):.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    if "--table" not in sys.argv:
        sys.exit("usage: python tests/test_plan_distributed.py --table  (measures every job on 2 gloo processes, "
                 "prints the table)")
    import tempfile

    with tempfile.TemporaryDirectory() as t:
        print(table(measure(Path(t))))
