""""Which method when", derived from a study's numbers by stated rules, never written by hand.

A method's *configurations* are its learning rates; a configuration run with several seeds counts once,
at its seeds' mean loss and KL (:func:`configurations`). The rules (each verdict carries its evidence
and the seed noise where a configuration ran with several seeds):

1. **Lowest loss**: the method of the configuration with the lowest held-out task loss.
2. **Least forgetting at matched skill**: each method's retention KL read off its own loss-vs-KL
   curve (:func:`lopt.recipes.study.matched.at_loss`) at ``WITHIN`` x that lowest loss; the method
   with the lowest reading. A method whose every run is less skilled does not reach it and is out.
   Reading every method at the same loss is what keeps "forgets less" from meaning "moves less": a
   gentle run of one method is not compared with an aggressive run of another.
3. **Fastest within the band**: among the methods that reach it, the highest tokens/s (``lopt bench``).
4. **Leanest within it**: among the same methods, the lowest whole-step peak memory.

A verdict whose margin over the runner-up is no larger than the seed noise says so ("within seed
noise"): such a difference is not a finding. Where neither method compared ran with several seeds,
the largest spread any method showed stands in, and the line says so.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from lopt.recipes.study.matched import Point, at_loss

WITHIN = 1.05  # rule 2-4's band: loss <= WITHIN x the best loss


@dataclass(frozen=True)
class RunResult:
    """One finished run, as the rules see it."""

    method: str
    run: str
    loss: float
    kl: float
    lr: float | None = None
    seed: int = 0
    drop: float | None = None


@dataclass(frozen=True)
class Cost:
    """A method's cost from ``lopt bench``: tokens/s and whole-step peak memory (MiB)."""

    tokens_per_s: float
    peak_mb: float | None


@dataclass
class Verdict:
    rule: str
    method: str | None
    evidence: str
    noise: str = ""
    details: dict = field(default_factory=dict)

    def line(self) -> str:
        who = f"**{self.method}**" if self.method else "no method"
        return f"- {self.rule}: {who}. {self.evidence}" + (f" {self.noise}" if self.noise else "")


def seed_noise(runs: Sequence[RunResult]) -> dict[str, dict[str, float]]:
    """``{method: {"loss": range, "kl": range, "seeds": n}}``: the largest max-min spread over the
    seeds of any one (method, lr) of that method; only methods with a configuration run at >= 2 seeds."""
    groups: dict[tuple[str, float | None], list[RunResult]] = {}
    for r in runs:
        groups.setdefault((r.method, r.lr), []).append(r)
    out: dict[str, dict[str, float]] = {}
    for (method, _), g in groups.items():
        if len({r.seed for r in g}) < 2:
            continue
        spread = {"loss": max(r.loss for r in g) - min(r.loss for r in g),
                  "kl": max(r.kl for r in g) - min(r.kl for r in g), "seeds": len(g)}
        old = out.get(method)
        out[method] = spread if old is None else {k: max(old[k], spread[k]) for k in spread}
    return out


def configurations(runs: Sequence[RunResult]) -> list[RunResult]:
    """One result per (method, lr): the mean loss, KL and drop over its seeds, named after its first
    run with "(mean of N seeds)" where there are several. Runs without a rate stay as they are."""
    groups: dict[tuple, list[RunResult]] = {}
    for r in runs:
        groups.setdefault((r.method, r.lr) if r.lr is not None else (r.method, r.run), []).append(r)
    out = []
    for g in groups.values():
        if len(g) == 1:
            out.append(g[0])
            continue
        first = min(g, key=lambda r: r.seed)
        drops = [r.drop for r in g]
        out.append(RunResult(first.method, f"{first.run} (mean of {len(g)} seeds)", sum(r.loss for r in g) / len(g),
                             sum(r.kl for r in g) / len(g), first.lr, first.seed,
                             None if None in drops else sum(drops) / len(g)))
    return out


def curves(runs: Sequence[RunResult]) -> dict[str, list[Point]]:
    """Each method's loss-vs-retention curve: one point per configuration (:func:`configurations`)."""
    return _points(configurations(runs))


def _points(configs: Sequence[RunResult]) -> dict[str, list[Point]]:
    out: dict[str, list[Point]] = {}
    for r in configs:
        out.setdefault(r.method, []).append(Point(r.loss, r.kl, r.drop, r.run))
    return out


def _noise_text(noise: dict[str, dict[str, float]], methods: Sequence[str], key: str, margin: float,
                spec: str) -> str:
    known = {m: noise[m][key] for m in methods if m in noise}
    if not known and noise:
        # Neither method ran twice: the largest spread any method showed stands in for theirs.
        proxy = max(noise, key=lambda m: noise[m][key])
        worst = noise[proxy][key]
        verdict = " The margin is within that: not a finding." if margin <= worst else ""
        return (f"Seed noise ({key}, max-min): not measured for these methods; the largest measured, {proxy}'s "
                f"{spec.format(worst)} over {int(noise[proxy]['seeds'])} seeds, stands in.{verdict}")
    if not known:
        return "Seed noise: not measured (no configuration of these methods ran with several seeds)."
    worst = max(known.values())
    parts = ", ".join(f"{m} {spec.format(v)} over {int(noise[m]['seeds'])} seeds" for m, v in known.items())
    verdict = " The margin is within seed noise: not a finding." if margin <= worst else ""
    return f"Seed noise ({key}, max-min): {parts}.{verdict}"


def _best_per_method(runs: Sequence[RunResult], key) -> dict[str, RunResult]:
    out: dict[str, RunResult] = {}
    for r in runs:
        if r.method not in out or key(r) < key(out[r.method]):
            out[r.method] = r
    return out


def which_method_when(runs: Sequence[RunResult], cost: dict[str, Cost],
                      within: float = WITHIN) -> list[Verdict]:
    """The four verdicts of the module's rules, from finished runs and the bench's cost per method."""
    runs = [r for r in runs if r.loss == r.loss and r.kl == r.kl]  # NaN: diverged, out of the race
    if not runs:
        return [Verdict("Lowest loss", None, "No finished run yet.")]
    noise = seed_noise(runs)
    configs = configurations(runs)
    out: list[Verdict] = []

    by_loss = sorted(_best_per_method(configs, lambda r: r.loss).values(), key=lambda r: r.loss)
    best = by_loss[0]
    if len(by_loss) > 1:
        second = by_loss[1]
        margin = second.loss - best.loss
        ev = (f"{best.run} reaches held-out loss {best.loss:.4f}; the next method, {second.method} "
              f"({second.run}), {second.loss:.4f} ({second.loss / best.loss:.3f}x).")
        out.append(Verdict("Lowest loss", best.method, ev,
                           _noise_text(noise, [best.method, second.method], "loss", margin, "{:.4f}")))
    else:
        out.append(Verdict("Lowest loss", best.method, f"{best.run} reaches held-out loss {best.loss:.4f}; "
                           "the only method with a finished run."))

    bound = within * best.loss
    curves_ = _points(configs)  # the configurations above, not built again
    readings = {m: at_loss(pts, bound) for m, pts in curves_.items()}
    reached = sorted((m for m, x in readings.items() if x.reached), key=lambda m: readings[m].kl)
    rule = f"Least forgetting at matched skill, {within:g}x the best loss ({bound:.4f})"
    outside = sorted(m for m, x in readings.items() if not x.reached)
    loss_noise = max((n["loss"] for n in noise.values()), default=None)

    def miss(m: str) -> str:
        closest = min(p.loss for p in curves_[m])
        near = (f", within the largest loss seed noise ({loss_noise:.4f}) of it"
                if loss_noise is not None and closest - bound <= loss_noise else "")
        return f"{m} (best {closest:.4f}{near})"

    tail = f" Not reaching it (every run less skilled): {', '.join(miss(m) for m in outside)}." if outside else ""

    def reading(m: str) -> str:
        x = readings[m]
        if x.how == "at most":
            return f"{m} at most {x.kl:.4f} (every run more skilled; the least KL, {x.runs[0]})"
        src = " and ".join(x.runs)
        return f"{m} {x.kl:.4f} (" + ("between " if len(x.runs) > 1 else "") + f"{src})"

    top = reached[0]
    ev = "Retention KL on each method's curve at that loss: " + "; ".join(reading(m) for m in reached) + "."
    if len(reached) > 1:
        second = reached[1]
        if readings[second].how == "at most":
            ev += (f" {second}'s figure is an upper bound: a gentler run of it could forget less.")
        out.append(Verdict(rule, top, ev + tail, _noise_text(noise, [top, second], "kl",
                                                             readings[second].kl - readings[top].kl, "{:.4f}")))
    else:
        out.append(Verdict(rule, top, ev + " The only method that reaches it." + tail))

    methods = reached
    benched = [m for m in methods if m in cost]
    missing = [m for m in methods if m not in cost]
    note = f" Not benched: {', '.join(missing)}." if missing else ""
    if benched:
        fast = sorted(benched, key=lambda m: -cost[m].tokens_per_s)
        ev = ", ".join(f"{m} {cost[m].tokens_per_s:.0f}" for m in fast)
        out.append(Verdict(f"Fastest within {within:g}x of the best loss", fast[0], f"tokens/s: {ev}.{note}",
                           "Cost from one lopt bench run (no seeds)."))
        lean = sorted([m for m in benched if cost[m].peak_mb is not None], key=lambda m: cost[m].peak_mb)
        if lean:
            ev = ", ".join(f"{m} {cost[m].peak_mb:.0f}" for m in lean)
            out.append(Verdict(f"Leanest within {within:g}x of the best loss", lean[0],
                               f"whole-step peak MiB: {ev}.{note}", "Cost from one lopt bench run (no seeds)."))
    else:
        out.append(Verdict(f"Fastest within {within:g}x of the best loss", None, f"No bench yet.{note}"))
    return out
