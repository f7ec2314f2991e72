""""Which method when", derived from a study's numbers by stated rules, never written by hand.

The rules (each verdict carries its evidence and the seed noise where a configuration ran with
several seeds):

1. **Lowest loss**: the method of the run with the lowest held-out task loss.
2. **Least forgetting within 1.05x of the best loss**: among the runs whose loss is at most
   ``WITHIN`` x the lowest loss of any run, the method of the one with the lowest retention KL.
3. **Fastest within it**: among the methods with a run inside that band, the highest tokens/s
   (``lopt bench``).
4. **Leanest within it**: among the same methods, the lowest whole-step peak memory.

A verdict whose margin over the runner-up is no larger than the seed noise says so ("within seed
noise"): such a difference is not a finding. Where neither method compared ran with several seeds,
the largest spread any method showed stands in, and the line says so.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

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
    out: list[Verdict] = []

    by_loss = sorted(_best_per_method(runs, lambda r: r.loss).values(), key=lambda r: r.loss)
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
    inside = [r for r in runs if r.loss <= bound]
    least = sorted(_best_per_method(inside, lambda r: r.kl).values(), key=lambda r: r.kl)
    rule = f"Least forgetting within {within:g}x of the best loss (<= {bound:.4f})"
    top = least[0]
    outside = sorted({r.method for r in runs} - {r.method for r in least})
    tail = f" Methods with no run inside: {', '.join(outside)}." if outside else ""
    if len(least) > 1:
        second = least[1]
        ev = (f"{top.run}: retention KL {top.kl:.4f} at loss {top.loss:.4f} ({top.loss / best.loss:.3f}x the best); "
              f"next, {second.method} ({second.run}): KL {second.kl:.4f}.{tail}")
        out.append(Verdict(rule, top.method, ev, _noise_text(noise, [top.method, second.method], "kl",
                                                             second.kl - top.kl, "{:.4f}")))
    else:
        out.append(Verdict(rule, top.method, f"{top.run}: retention KL {top.kl:.4f} at loss {top.loss:.4f}; "
                           f"the only method inside.{tail}"))

    methods = [r.method for r in least]
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
