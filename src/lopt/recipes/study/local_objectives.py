"""Issue 29's runs: each candidate local objective as the paper's pure local learning
(``--task-grad-every 0``), trained and evaluated exactly as study v3's runs are, so that every run sits on
study v3's loss-vs-retention plane beside freeze-lower (the bar), lopt's default and e2e.

The runs are pieces of a ``lopt study`` with study v3's options (``records/study-v3/results/meta.json``):
the same training rows in the same order, schedule, precision (bf16-mixed), upper learning rate (lopt's
swept best), held-out rows, retention prompts (the base's answers are study v3's, cached) and drift.
Each candidate trains its lower half at the upper rate (the paper's choice); those a gentler rate could
change (``SECOND_RATE``) at a tenth of it too (lopt's former default).
A freeze-lower control runs at the same upper rate (study v3's freeze-lower runs lie at other rates).
A finished piece is never redone; a killed run continues from its last checkpoint.

    python -m lopt.recipes.study.local_objectives --data-dir /path/to/data
    python -m lopt.recipes.study.local_objectives --data-dir /path/to/data --only early-exit-lower1e-05
    python -m lopt.recipes.study.local_objectives --report      # RESULTS.md from the records only

Records: ``records/local-objectives/results/`` (bench, and ``runs/NAME/{train,eval}.json``, each with its
exact ``lopt train`` command); ``RESULTS.md`` is regenerated from them and study v3's records.
"""
from __future__ import annotations

import argparse
from dataclasses import fields
from pathlib import Path
from typing import Any

from lopt.engine.config import LoPTError
from lopt.recipes.study.activations import load_records
from lopt.recipes.study.command import Study, StudyOptions, as_trained
from lopt.recipes.study.matched import Point, at_loss
from lopt.recipes.study.records import Records, write_text

OUT = Path("records/local-objectives")
STUDY = Path("records/study-v3")
# In the order they run: the classic local-learning signal first, then the anchored reconstructions.
CANDIDATES = ("early-exit", "recon+cos", "recon+anchor", "recon-std")
# The lower half's rate as a multiple of the upper one: the paper's (every candidate), then lopt's former
# default for the candidates a gentler rate could change. Chosen from the first rate's runs and activation
# statistics (records/local-objectives/README.md): early-exit learns from the task but drifts at the
# paper's rate; recon+anchor and recon+cos hold the boundary already (a lower rate only brings them nearer
# freezing); recon-std collapses the states; recon at the tenth is study v2's lopt-default, which broke down.
LOWER_FACTORS = (1.0, 0.1)
SECOND_RATE = ("early-exit",)
# A candidate passes when it costs no more than the paper's LoPT (pure recon) in the same bench: the step's
# peak memory at most this much above, its tokens/s at most this much below (the bench's repeat-to-repeat
# spread on this machine is a few percent).
COST_TOLERANCE = 0.05
NOTES = "notes.md"  # results/notes.md: the hand-written reading of the records, appended to RESULTS.md


def study_meta(study: Path = STUDY) -> dict[str, Any]:
    """The reference study's ``meta`` record (its options, data digest, swept rates and runs)."""
    meta = Records(study / "results").read("meta")
    if meta is None:
        raise LoPTError(f"{study}: no results/meta.json; run the study first")
    return meta


def study_options(study: Path = STUDY, **changes: Any) -> StudyOptions:
    """Study v3's options as recorded, with ``changes`` (the output folder, the data folder, ...)."""
    meta = study_meta(study)
    known = {f.name for f in fields(StudyOptions)}
    return StudyOptions(**{**{k: v for k, v in meta["options"].items() if k in known}, **changes})


def objective_options(study: Path, out: Path, data_dir: str | None = None) -> StudyOptions:
    """The runs' study options: the reference study's, lopt only (its options naming its other methods,
    seed repeats and rates, do not apply), written to ``out``."""
    return study_options(study, output_dir=str(out), methods=["lopt"], seed_methods=[], method_rates=[], start_lr=[],
                         data_dir=data_dir)


def upper_lr(study: Path = STUDY) -> float:
    """The upper half's rate in every run: study v3's swept best for lopt."""
    best = study_meta(study).get("best") or {}
    if "lopt" not in best:
        raise LoPTError(f"{study}: no swept rate for lopt recorded; run the study first")
    return float(best["lopt"])


def control(lr: float) -> dict[str, Any]:
    """freeze-lower at the runs' own upper rate: the reference study's freeze-lower runs lie at other rates,
    and an objective that holds the boundary where the base had it is freezing plus its side effects."""
    return {"run": f"freeze-lower-lr{lr:g}", "method": "freeze-lower", "lr": lr, "seed": 0}


def runs(lr: float, candidates: tuple[str, ...] = CANDIDATES, second: tuple[str, ...] = SECOND_RATE
         ) -> list[dict[str, Any]]:
    """The runs in order: the freeze-lower control, every candidate at the first lower rate, then those
    of ``second`` at the next."""
    todo = [(c, lr * f) for f in LOWER_FACTORS for c in candidates if f == LOWER_FACTORS[0] or c in second]
    return [control(lr)] + [
        {"run": f"{obj}-lower{lower:g}", "method": "lopt", "lr": lr, "seed": 0, "objective": obj,
         "extra": {"task_grad_every": 0, "lr_lower": lower, "local_objective": obj}} for obj, lower in todo]


def bench_name(objective: str) -> str:
    return f"pure {objective}"


class ObjectiveStudy(Study):
    """Study v3's setup, training the local-objective runs: its data (checked by digest), its cached
    base answers, and a bench of every objective beside study v3's reference methods."""

    def __init__(self, opts: StudyOptions, study: Path = STUDY, candidates: tuple[str, ...] = CANDIDATES):
        super().__init__(opts)
        self.study, self.candidates = study, candidates
        want = study_meta(study)["data"]["digest"]
        if self.data.digest != want:
            raise LoPTError(f"the training or held-out rows differ from {study}'s (digest {self.data.digest}, "
                            f"recorded {want}): give the data folder the study used (--data-dir)")
        self.cache_dir = study / "cache"

    def bench_table(self) -> dict[str, dict[str, Any]]:
        steps = self.opts.steps
        table = {m: as_trained(self.overrides(m, steps)) for m in ("e2e", "freeze-lower", "lopt")}
        for obj in ("recon",) + self.candidates:
            table[bench_name(obj)] = as_trained({**self.overrides("lopt", steps), "task_grad_every": 0,
                                                 "local_objective": obj})
        return table

    def step_seconds(self, method: str) -> float | None:
        # Every run is lopt without the task gradient below the boundary: the pure recon row times them.
        return super().step_seconds(bench_name("recon") if method == "lopt" else method)


# --------------------------------------------------------------------------- the report


def _point(rec: Records, name: str) -> tuple[Point, dict[str, Any], dict[str, Any]] | None:
    """A run's point on the loss-vs-KL plane, its train record and its evaluation (None: not recorded)."""
    tr, ev = rec.read(f"runs/{name}/train"), rec.read(f"runs/{name}/eval")
    if tr is None or ev is None:
        return None
    e = ev["eval"]
    return Point(e["task_loss"]["loss"], e["retention_kl"]["kl"], run=name), tr, e


def _cost(out: Path) -> dict[str, dict[str, float]]:
    from lopt.bench.runner import load_bench_json

    rec = Records(out / "results").read("bench")
    if rec is None:
        return {}
    return {r["name"]: {"tokens_per_s": r["tokens_per_s"], "peak_mb": r["peak_step_mb"]}
            for r in load_bench_json(rec)["rows"]}


def verdict(point: Point, freeze: list[Point], cost: dict[str, float] | None,
            paper: dict[str, float] | None) -> tuple[bool, str]:
    """Issue 29's bar: a freeze-lower run that ``point`` beats on held-out loss at no more retention KL,
    and no more cost than the paper's LoPT (pure recon) in the same bench. ``(passes, why)``."""
    beaten = [f for f in freeze if point.loss < f.loss and point.kl <= f.kl]
    if not beaten:
        m = at_loss(freeze, point.loss)
        where = (f"freeze-lower's KL at this loss is {m.text()}" if m.reached
                 else f"freeze-lower's lowest loss is {min(f.loss for f in freeze):.4f}") if freeze else "no freeze-lower run"
        return False, f"beats no freeze-lower run on both loss and KL ({where})"
    if cost is None or paper is None:
        return False, f"beats {', '.join(f.run for f in beaten)}; cost not benched"
    mem, speed = cost["peak_mb"] / paper["peak_mb"], cost["tokens_per_s"] / paper["tokens_per_s"]
    if mem > 1 + COST_TOLERANCE or speed < 1 - COST_TOLERANCE:
        return False, (f"beats {', '.join(f.run for f in beaten)} but costs more than the paper's LoPT "
                       f"({mem:.2f}x its memory, {speed:.2f}x its tokens/s)")
    return True, f"beats {', '.join(f.run for f in beaten)} at {mem:.2f}x the paper's memory, {speed:.2f}x its tokens/s"


def reference_runs(study: Path, method: str) -> list[tuple[Point, dict[str, Any], dict[str, Any]]]:
    """``method``'s recorded runs in ``study`` (first seed only: the candidates have one), by loss:
    (point, train record, evaluation)."""
    meta, rec = study_meta(study), Records(study / "results")
    got = [_point(rec, run["run"]) for run in meta.get("runs") or []
           if run["method"] == method and run["seed"] == meta["options"]["seeds"][0]]
    return sorted((g for g in got if g), key=lambda g: g[0].loss)


def write_results(out: Path = OUT, study: Path = STUDY) -> Path:
    """``out/RESULTS.md``: every run (recorded or not) beside study v3's references, with the bar's verdict,
    the activation statistics, and ``results/notes.md`` (the reading of them) where it is written."""
    lr = upper_lr(study)
    cost = _cost(out)
    records = Records(out / "results")
    paper = cost.get(bench_name("recon"))
    refs = {m: reference_runs(study, m) for m in ("freeze-lower", "lopt", "e2e")}
    ctrl_run = control(lr)
    ctrl = _point(records, ctrl_run["run"])
    freeze = [p for p, _, _ in refs["freeze-lower"]] + ([ctrl[0]] if ctrl else [])
    head = ["run", "lower lr", "held-out loss", "retention KL", "boundary cos", "train s", "tokens/s x", "memory x",
            "the bar"]

    def row(name: str, lower: str, got: tuple | None, c: dict[str, float] | None, bar: str) -> list[str]:
        measured = ([f"{got[0].loss:.4f}", f"{got[0].kl:.4f}", f"{got[2]['drift']['cos_at_boundary']:.3f}",
                     f"{got[1]['train_seconds']:.0f}"] if got else ["not run yet", "", "", ""])
        return [name, lower, *measured, _ratio(c, paper, "tokens_per_s"), _ratio(c, paper, "peak_mb"), bar]

    rows = [row(f"study v3: {got[0].run}", "-" if method != "lopt" else f"{got[1]['spec']['lr']:g} (task grad every 4)",
                got, cost.get(method), "reference") for method, done in refs.items() for got in done]
    rows.append(row(f"control: {ctrl_run['run']}", "-", ctrl, cost.get(ctrl_run["method"]), "reference"))
    for run in runs(lr):
        if "objective" not in run:  # the control, above
            continue
        got = _point(records, run["run"])
        c = cost.get(bench_name(run["objective"]))
        bar = ""
        if got:
            ok, why = verdict(got[0], freeze, c, paper)
            bar = ("passes: " if ok else "fails: ") + why
        rows.append(row(run["run"], f"{run['extra']['lr_lower']:g}", got, c, bar))
    table = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows]
    text = ("# Local objectives (issue 29): results\n\nGenerated by `python -m lopt.recipes.study.local_objectives "
            "--report` from `results/` and study v3's records (`" + str(study) + "/results`); do not edit. Every run: "
            f"study v3's 256 steps x 4 GSM8K examples in bf16-mixed, upper lr {lr:g}, seed 0, the lower half "
            "trained only by its local objective (`--task-grad-every 0`). The bar: held-out loss below a freeze-lower "
            "run's at retention KL no higher than that run's, at no more cost than the paper's LoPT (`pure recon` in "
            f"the same bench, {COST_TOLERANCE:.0%} tolerance). Cost: `lopt bench` ratios against pure recon, one run "
            "on this project's 2-core CPU.\n\n" + "\n".join(table) + "\n")
    stats = activation_lines(out / "activations")
    if stats:
        text += ("\n## Activation statistics\n\nFrom `python -m lopt.recipes.study.activations` (each record in "
                 "`activations/` holds its command): pure local learning for a few steps in fp32, measured on 16 "
                 "held-out GSM8K questions at the boundary, the first token apart from the ordinary tokens; the "
                 "top-5 dimensions are the base's largest by RMS. Full steps: the share of each kind of lower weight "
                 "whose next AdamW step is at least half the learning rate. Figure: "
                 "[activations/activations.png](activations/activations.png).\n\n" + "\n".join(stats) + "\n")
    notes = out / "results" / NOTES
    if notes.is_file():  # the reading of the figures, written by hand once they are in
        text += "\n" + notes.read_text().strip() + "\n"
    path = out / "RESULTS.md"
    write_text(path, text)
    return path


def activation_lines(folder: Path) -> list[str]:
    """The activation statistics' table (``lopt.recipes.study.activations`` records in ``folder``): each
    objective's boundary state at its last traced step against the base's, and how many lower weights
    take full-size AdamW steps."""
    records = load_records(folder)
    if not records:
        return []
    kinds = sorted({k for r in records for k in r["trace"][-1]["adam_steps"]})
    head = ["objective, lower lr (step)", "boundary cos", "cos without top-5 dims", "first-token norm x base",
            "median RMS of the rest x base", "effective rank (base)"] + [f"full steps: {k}" for k in kinds]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in records:
        last = r["trace"][-1]
        b, base = last["boundary"], last["base_boundary"]
        lines.append("| " + " | ".join(
            [f"{r['objective']}, {r['lr_lower']:g} ({last['step']})", f"{b['cos']:.3f}", f"{b['cos_without_massive']:.3f}",
             f"{b['first_norm'] / base['first_norm']:.2f}", f"{b['rest_rms_median'] / base['rest_rms_median']:.2f}",
             f"{b['effective_rank']:.0f} ({base['effective_rank']:.0f})"]
            + [f"{last['adam_steps'][k]['full_step_fraction']:.0%}" if k in last["adam_steps"] else "-" for k in kinds])
            + " |")
    return lines


def _ratio(c: dict[str, float] | None, ref: dict[str, float] | None, key: str) -> str:
    return f"{c[key] / ref[key]:.2f}" if c and ref else "-"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", help="the folder holding gsm8k/ that study v3 used (default: $LOPT_DATA_DIR)")
    p.add_argument("--only", nargs="+", metavar="RUN", help="runs to do (default all, in order)")
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--study", type=Path, default=STUDY, help="the study whose setup and references the runs share")
    p.add_argument("--report", action="store_true", help="regenerate RESULTS.md from the records; train nothing")
    a = p.parse_args(argv)
    try:
        lr = upper_lr(a.study)
        todo = runs(lr)
        names = [r["run"] for r in todo]
        unknown = [n for n in a.only or [] if n not in names]
        if unknown:
            raise LoPTError(f"unknown run(s) {unknown}: choose from {', '.join(names)}")
        if not a.report:
            from lopt.models import quiet_progress

            opts = objective_options(a.study, a.out, a.data_dir)
            with quiet_progress():
                st = ObjectiveStudy(opts, a.study)
                st.data.write()
                st.bench()
                selected = [r for r in todo if not a.only or r["run"] in a.only]
                for v in selected:
                    st.progress.add(st.train_estimate("lopt", opts.steps) + st.eval_estimate())
                for r in selected:
                    st.run(r)
                    write_results(a.out, a.study)
    except LoPTError as e:
        raise SystemExit(f"error: {e}") from None
    print(write_results(a.out, a.study))
    return 0


if __name__ == "__main__":
    main()
