"""The report of a ``lopt study``, from its records alone (``OUT/results``): ``OUT/RESULTS.md``,
``OUT/study.json`` and ``OUT/loss-vs-retention.png``.

It holds every run's numbers, each method's loss-vs-retention curve with its cost beside it, the
retention at matched task skill (:mod:`lopt.recipes.study.matched`: KL and suite drop at e2e's best
held-out loss and at 1.02x and 1.05x of it, or "does not reach"), tokens/s and peak memory from
``lopt bench``, and the rules-based "which method when" (:mod:`lopt.recipes.study.rules`). A study
still running has a true, partial report: what has no record is said to be missing, never guessed.

:func:`readme_block` is the compact form a README carries ("which method when" and the matched-skill
table), kept in step with the records by :func:`sync_readme` between the study's markers
(:func:`readme_markers`); ``python -m lopt.recipes.study.summary OUT --readme README.md`` regenerates
both from the records.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from lopt.bench.runner import load_bench_json
from lopt.recipes.study.matched import FACTORS, matched_table
from lopt.recipes.study.records import Records, write_json, write_text
from lopt.recipes.study.rules import WITHIN, Cost, RunResult, which_method_when
from lopt.recipes.study.rules import curves as rules_curves


def _count(n: int, what: str) -> str:
    return f"{n} {what}" + ("" if n == 1 else "s")


def _suite_drop(ev: dict[str, Any]) -> float | None:
    """Mean change of the suite's primary metrics from the base, as a drop (positive: forgotten)."""
    suite = ev.get("suite")
    if not suite:
        return None
    return -sum(t["change"] for t in suite.values()) / len(suite)


def collect(out: Path) -> dict[str, Any]:
    """Everything the report says, as one JSON-able dict (also written to ``OUT/study.json``)."""
    records = Records(Path(out) / "results")
    meta = records.read("meta")
    if meta is None:
        raise FileNotFoundError(f"{records.path('meta')}: no study records to report on")
    methods = meta["options"]["methods"]
    bench = load_bench_json(records.read("bench"))
    cost = {r["name"]: {"tokens_per_s": r["tokens_per_s"], "peak_mb": r.get("peak_step_mb"),
                        "step_time_s": r["step_time_s"]} for r in (bench or {}).get("rows", [])}
    sweep = {m: [] for m in methods}
    for m in methods:
        for lr in meta["grids"][m]:
            rec = records.read(f"sweep/{m}-lr{lr:g}")
            if rec:
                sweep[m].append({"lr": lr, "loss": rec["val"]["loss"], "seconds": rec.get("train_seconds")})
    base = records.read("base/eval")
    runs, missing = [], []
    for r in meta.get("runs") or []:
        train, ev = records.read(f"runs/{r['run']}/train"), records.read(f"runs/{r['run']}/eval")
        if not ev:
            missing.append(r["run"])
            continue
        e = ev["eval"]
        runs.append({**r, "loss": e["task_loss"]["loss"], "kl": e["retention_kl"]["kl"], "drop": _suite_drop(e),
                     "cos_at_boundary": e["drift"]["cos_at_boundary"], "boundary": e["drift"]["boundary"],
                     "train_seconds": (train or {}).get("train_seconds"), "eval_seconds": e.get("seconds"),
                     "command": (train or {}).get("command")})
    results = [RunResult(r["method"], r["run"], r["loss"], r["kl"], r["lr"], r["seed"], r["drop"]) for r in runs]
    curves = rules_curves(results)  # one point per learning rate, the mean over its seeds
    e2e = [p.loss for p in curves.get("e2e", [])]
    if e2e:
        ref, ref_from = min(e2e), "e2e's best held-out loss"
    elif curves:
        ref = min(p.loss for pts in curves.values() for p in pts)
        ref_from = "the best held-out loss of any run (e2e is not in the study)"
    else:
        ref, ref_from = None, None
    matched = {}
    if ref is not None:
        for m, row in matched_table({m: c for m, c in curves.items() if c}, ref).items():
            matched[m] = {f"{f:g}": {"target": x.target, "reached": x.reached, "kl": x.kl, "drop": x.drop,
                                     "how": x.how} for f, x in row.items()}
    verdicts = which_method_when(
        results, {m: Cost(c["tokens_per_s"], c["peak_mb"]) for m, c in cost.items()})
    seconds = {"bench": (bench or {}).get("wall_s") or 0.0,
               "sweep": sum(p["seconds"] or 0.0 for pts in sweep.values() for p in pts),
               "runs": sum((r["train_seconds"] or 0.0) + (r["eval_seconds"] or 0.0) for r in runs),
               "base": ((base or {}).get("eval") or {}).get("seconds", 0.0)}
    return {"meta": {k: v for k, v in meta.items() if k != "spec"}, "base": (base or {}).get("eval"),
            "sweep": sweep, "runs": runs, "missing": missing, "cost": cost, "reference_loss": ref,
            "reference": ref_from, "matched": matched, "which_method_when": [
                {"rule": v.rule, "method": v.method, "evidence": v.evidence, "noise": v.noise} for v in verdicts],
            "which_lines": [v.line() for v in verdicts], "seconds": seconds}


def _f(x: Any, spec: str = "{:.4f}") -> str:
    return "-" if x is None else spec.format(x)


def _matched_cell(m: dict[str, Any], with_drop: bool) -> str:
    if not m["reached"]:
        return "does not reach"
    text = ("<= " if m["how"] == "at most" else "") + f"{m['kl']:.4f}"
    if with_drop and m["drop"] is not None:
        text += f" / {m['drop'] * 100:+.1f} pt"
    return text


def markdown(s: dict[str, Any]) -> str:
    meta, o = s["meta"], s["meta"]["options"]
    suite = bool(meta.get("suite"))
    lines = [f"# lopt study: {o['model'] or 'smollm2-135m-instruct (embedded)'} on {o['dataset']}", "",
             "Generated by `lopt study` from the records in `results/`; rerun the command to resume or refresh.", ""]
    if meta.get("runs") is None or s["missing"]:
        todo = "the sweep is not finished" if meta.get("runs") is None else \
            f"{len(s['missing'])} of {len(meta['runs'])} runs have no evaluation yet ({', '.join(s['missing'])})"
        lines += [f"**Partial report**: {todo}. The study resumes where it stopped.", ""]
    lines += ["## Which method when", "", "Derived from the numbers below by stated rules (lopt.recipes.study.rules): "
              f"lowest loss; least forgetting (retention KL) at matched skill, each method read off its own curve at "
              f"{WITHIN:g}x the best loss; the fastest and the leanest of the methods that reach it. A learning rate "
              "run with several seeds counts once, at their mean.", "", *s["which_lines"], ""]
    lines += ["## Retention at matched task skill", ""]
    if s["reference_loss"] is None:
        lines += ["No finished run yet.", ""]
    else:
        head = " | ".join(f"KL at {f:g}x ({f * s['reference_loss']:.4f})" for f in FACTORS)
        lines += [f"Reference: {s['reference']} (a rate's seeds averaged), {s['reference_loss']:.4f}. Each method's retention KL"
                  + (" / suite drop" if suite else "") + " read off its own loss-vs-KL curve (lopt.recipes.study."
                  "matched): interpolated between its runs, \"does not reach\" when every run's loss is above the "
                  "target, \"<=\" when every run is below it (the lowest KL of its runs, an upper bound).", "",
                  f"| method | {head} | tokens/s | peak MiB |", "|---|" + "---|" * (len(FACTORS) + 2)]
        for m, row in s["matched"].items():
            c = s["cost"].get(m, {})
            lines.append(f"| {m} | " + " | ".join(_matched_cell(row[f"{f:g}"], suite) for f in FACTORS)
                         + f" | {_f(c.get('tokens_per_s'), '{:.0f}')} | {_f(c.get('peak_mb'), '{:.0f}')} |")
        lines.append("")
    lines += ["## Runs", "", "| run | method | lr | seed | held-out loss | retention KL | "
              + ("suite drop (pt) | " if suite else "") + "cos at boundary | train s |",
              "|---|---|---|---|---|---|" + ("---|" if suite else "") + "---|---|"]
    base = s["base"]
    if base:
        lines.append(f"| base | - | - | - | {base['task_loss']['loss']:.4f} | 0 | " + ("0 | " if suite else "")
                     + "1 | - |")
    for r in s["runs"]:
        lines.append(f"| {r['run']} | {r['method']} | {r['lr']:g} | {r['seed']} | {r['loss']:.4f} | {r['kl']:.4f} | "
                     + (f"{_f(r['drop'] * 100 if r['drop'] is not None else None, '{:+.1f}')} | " if suite else "")
                     + f"{r['cos_at_boundary']:.4f} | {_f(r['train_seconds'], '{:.0f}')} |")
    lines += ["", "Held-out loss: " + meta["data"]["eval"] + ". Retention KL: mean per-token KL(base || run) on the "
              f"base's answers to {o['retention_prompts']} general prompts (0 = unchanged). Cos at boundary: mean "
              "cosine to the base of the hidden state entering the boundary layer (the midpoint for methods "
              "without one).", ""]
    lines += ["## Cost: `lopt bench`", "", f"Batch {o['batch_size']}, up to {o['max_length']} tokens, on the "
              "study's training rows; a fresh process per method.", "",
              "| method | step s | tokens/s | peak MiB |", "|---|---|---|---|"]
    lines += [f"| {m} | {c['step_time_s']:.3f} | {c['tokens_per_s']:.0f} | {_f(c['peak_mb'], '{:.0f}')} |"
              for m, c in s["cost"].items()]
    lines += ["", "## Learning-rate sweep", "", f"{meta['sweep_steps']} steps a run; {meta['data']['sweep']}. "
              f"Each method's grid is its starting rate times {', '.join(f'{f:g}' for f in o['lr_factors'])}; "
              "it is then trained at the first rates of " + ", ".join(f"{f:g}" for f in meta["rate_factors"])
              + " x its best (" + ", ".join(f"{m} {n}" for m, n in (meta.get("rates") or {}).items()) + ").", "",
              "| method | rate -> held-out loss |", "|---|---|"]
    for m, pts in s["sweep"].items():
        best = (meta.get("best") or {}).get(m)
        lines.append(f"| {m} | " + ", ".join(f"{p['lr']:g} -> {p['loss']:.4f}" + (" (best)" if p["lr"] == best else "")
                                             for p in pts) + " |")
    lines += ["", "## Setup", "", f"- Data: {meta['data']['train_rows']} of {meta['data']['rows']} rows of "
              f"{o['dataset']} trained on, {o['steps']} steps of {o['batch_size']}; {meta['data']['eval']}."]
    lines += [f"- Schedule: {n}." for n in meta["schedules"].values()]
    m = meta["machine"]
    lines += [f"- Machine: {m['cpus']} CPUs ({m['platform']}), GPU {m.get('cuda') or 'none'}; torch {m['torch']}, "
              f"transformers {m['transformers']}.", "",
              "## Wall time", "", "| phase | minutes |", "|---|---|"]
    lines += [f"| {k} | {v / 60:.1f} |" for k, v in s["seconds"].items()]
    lines += [f"| **total** | **{sum(s['seconds'].values()) / 60:.1f}** |", "", "## Reproduce", "",
              "Each run is this `lopt train` command (the study saves a checkpoint every quarter of the steps to "
              "resume a killed run, then evaluates the saved model):", "", "```"]
    lines += [r["command"] for r in s["runs"] if r.get("command")]
    lines += ["```", "", "![loss against retention, cost beside it](loss-vs-retention.png)", ""]
    return "\n".join(lines)


def plot(s: dict[str, Any], path: Path) -> bool:
    """Each method's held-out loss against retention KL (its runs joined in loss order), e2e's reference
    losses as lines, and each method's cost beside it (tokens/s against peak memory)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (ax, cx) = plt.subplots(1, 2, figsize=(12, 5))
    colors = {}
    for m in s["meta"]["options"]["methods"]:
        pts = sorted((r["loss"], r["kl"]) for r in s["runs"] if r["method"] == m)
        if not pts:
            continue
        line, = ax.plot([p[1] for p in pts], [p[0] for p in pts], marker="o", label=m)
        colors[m] = line.get_color()
    if s["reference_loss"] is not None:
        for f in FACTORS:
            ax.axhline(f * s["reference_loss"], color="grey", linewidth=0.6, linestyle=":")
    ax.set_xlabel("retention KL(base || run) (right: forgot more)")
    ax.set_ylabel("held-out task loss (lower: better)")
    ax.set_title("Loss against retention, one point per run")
    if colors:
        ax.legend(fontsize=8)
    for m, c in s["cost"].items():
        if c.get("peak_mb") is None:
            continue
        cx.scatter(c["tokens_per_s"], c["peak_mb"], color=colors.get(m))
        cx.annotate(m, (c["tokens_per_s"], c["peak_mb"]), fontsize=8, xytext=(3, 3), textcoords="offset points")
    cx.set_xlabel("tokens/s (lopt bench)")
    cx.set_ylabel("whole-step peak memory, MiB")
    cx.set_title("Cost")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def write_summary(out: Path) -> dict[str, str]:
    """Write ``OUT/RESULTS.md``, ``OUT/study.json`` and ``OUT/loss-vs-retention.png`` from the records."""
    out = Path(out)
    s = collect(out)
    write_json(out / "study.json", s)
    write_text(out / "RESULTS.md", markdown(s))
    paths = {"markdown": str(out / "RESULTS.md"), "json": str(out / "study.json")}
    if plot(s, out / "loss-vs-retention.png"):
        paths["plot"] = str(out / "loss-vs-retention.png")
    return paths


def read_summary(out: Path) -> dict[str, Any]:
    return json.loads((Path(out) / "study.json").read_text())


# --------------------------------------------------------------------------- the README's block


def _where(out: Path, root: Path | None) -> str:
    """``out`` as a path relative to ``root`` (the README's folder), for the block's links and markers."""
    if root is None:
        return Path(out).as_posix()
    return Path(os.path.relpath(Path(out).resolve(), Path(root).resolve())).as_posix()


def readme_markers(out: Path, root: Path | None = None) -> tuple[str, str]:
    """The lines that open and close a study's block in a README: named by the study's folder, so that
    one README can carry the blocks of several studies (``records/study-v3``, ``records/study-v3-gemma3``)."""
    where = _where(out, root)
    name = Path(where).name
    return (f"<!-- {name}: generated from {where} by lopt.recipes.study.summary; do not edit -->",
            f"<!-- /{name} -->")


def _ratio(c: dict[str, Any] | None, ref: dict[str, Any] | None, key: str) -> str:
    if not c or not ref or c.get(key) is None or not ref.get(key):
        return "-"
    return f"{c[key] / ref[key]:.2f}"


def readme_block(out: Path, root: Path | None = None) -> list[str]:
    """A README's compact summary of the study in ``out``, from its records alone: the rules-based
    "which method when" lines with their evidence, and the matched-skill table (each method's retention
    KL at e2e's best held-out loss and at 1.02x and 1.05x of it; tokens/s and peak memory against e2e's).
    Links point at ``out``'s RESULTS.md relative to ``root`` (the README's folder)."""
    s = collect(out)
    meta, o = s["meta"], s["meta"]["options"]
    where = _where(out, root)
    model = o["model"] or "smollm2-135m-instruct (embedded)"
    prec = "" if o.get("precision", "auto") == "auto" else f", {o['precision']} precision"
    lines = [f"`lopt study` on {model} with {o['dataset']} ({o['steps']} steps of {o['batch_size']}{prec}; "
             f"methods {', '.join(o['methods'])}; {_count(len(s['runs']), 'run')} finished): every run, the sweep and the "
             f"evidence in [RESULTS.md]({where}/RESULTS.md).", ""]
    if meta.get("runs") is None or s["missing"]:
        todo = "the sweep is not finished" if meta.get("runs") is None else \
            f"{len(s['missing'])} of {len(meta['runs'])} runs have no evaluation yet"
        lines += [f"**Partial**: {todo}; the figures below are the finished runs'.", ""]
    lines += [f"Which method when, by stated rules (lopt.recipes.study.rules; the band is {WITHIN:g}x the best "
              "loss; a rate's seeds count once, at their mean):", "", *s["which_lines"], ""]
    if s["reference_loss"] is None:
        return lines + ["No finished run yet."]
    suite = bool(meta.get("suite"))
    ref_cost = s["cost"].get("e2e")
    at = "e2e's best held-out loss" if s["reference"].startswith("e2e") else "the best held-out loss"
    lines += [f"Retention KL{' / suite drop' if suite else ''} at matched task skill, read off each method's "
              f"loss-vs-KL curve at {at} ({s['reference_loss']:.4f}) and at 1.02x and 1.05x of it (\"<=\": every "
              "run is more skilled, the lowest KL of its runs); cost from `lopt bench` against e2e's:", "",
              "| method | " + " | ".join(f"KL at {f:g}x" for f in FACTORS) + " | tokens/s x e2e | peak memory x e2e |",
              "|---|" + "---|" * (len(FACTORS) + 2)]
    for m, row in s["matched"].items():
        c = s["cost"].get(m)
        lines.append(f"| {m} | " + " | ".join(_matched_cell(row[f"{f:g}"], suite) for f in FACTORS)
                     + f" | {_ratio(c, ref_cost, 'tokens_per_s')} | {_ratio(c, ref_cost, 'peak_mb')} |")
    return lines


def sync_readme(readme: Path, out: Path) -> bool:
    """Rewrite the block of the study in ``out`` between its markers (:func:`readme_markers`) in
    ``readme`` with :func:`readme_block`; a README without both markers is left alone. Returns
    whether the README holds the block now."""
    readme = Path(readme)
    if not readme.is_file():
        return False
    start, end = readme_markers(out, readme.parent)
    text = readme.read_text()
    if start not in text or end not in text:
        return False
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    new = head + start + "\n" + "\n".join(readme_block(out, readme.parent)) + "\n" + end + tail
    if new != text:
        write_text(readme, new)
    return True


def main(argv: list[str] | None = None) -> int:
    """``python -m lopt.recipes.study.summary OUT [--readme README.md]``: regenerate a study's report from
    its records (a study still running gets a true, partial one) and refresh its README block."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m lopt.recipes.study.summary", description=main.__doc__.split("\n")[0])
    p.add_argument("out", help="the study's folder (lopt study's --output-dir)")
    p.add_argument("--readme", default=None, help="also rewrite this README's block of the study, between its "
                   "markers (lopt.recipes.study.summary.readme_markers)")
    ns = p.parse_args(argv)
    try:
        paths = write_summary(Path(ns.out))
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"report: {paths['markdown']}")
    if ns.readme:
        if not sync_readme(Path(ns.readme), Path(ns.out)):
            start, end = readme_markers(Path(ns.out), Path(ns.readme).parent)
            print(f"error: {ns.readme} has no block for {ns.out}: put the lines {start} and {end} where it goes",
                  file=sys.stderr)
            return 2
        print(f"README block: {ns.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
