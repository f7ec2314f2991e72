"""Retention at matched task skill: a method's retention KL (and suite drop) read off its own
loss-vs-retention curve at a target held-out loss, so that "forgets less" is not "moves less".

A method's curve is its runs (one per learning rate, or seed) as points ``(loss, kl[, drop])``. Sorted
by loss, consecutive points are joined by straight lines; the value at a target loss ``t`` is:

- ``t`` below every point's loss: the method **does not reach** that skill (``reached=False``, no value);
- ``t`` between the lowest and the highest loss: linear interpolation between the two points whose
  losses bracket ``t`` (a point whose loss is ``t`` gives its own value) (``how="interpolated"``);
- ``t`` above every point's loss: every run is at least as skilled as asked, so the method reaches
  ``t`` with at most the lowest KL among its points; that value is given as an upper bound
  (``how="at most"``), since nothing measured says how much less a gentler run would forget. We do
  not extrapolate beyond the measured points.

Points with the same loss are one point: the lowest KL (and its drop) among them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

# The targets of the matched-skill table: e2e's best held-out loss times each of these.
FACTORS = (1.0, 1.02, 1.05)


@dataclass(frozen=True)
class Point:
    """One run of a method: held-out task loss, retention KL, optionally the suite's drop (points lost
    from the base, positive = forgotten), and the run's name for the evidence."""

    loss: float
    kl: float
    drop: float | None = None
    run: str = ""


@dataclass(frozen=True)
class Matched:
    """A method's retention at one target loss: ``reached`` False means "does not reach"."""

    target: float
    reached: bool
    kl: float | None = None
    drop: float | None = None
    how: str = "does not reach"  # "interpolated" | "at most" | "does not reach"
    runs: tuple[str, ...] = ()  # the points the value was read from (their ``run`` names)

    def text(self, spec: str = "{:.4f}") -> str:
        if not self.reached:
            return "does not reach"
        return ("<= " if self.how == "at most" else "") + spec.format(self.kl)


def _curve(points: Iterable[Point]) -> list[Point]:
    """The points sorted by loss, one per loss (the lowest KL among equal losses)."""
    best: dict[float, Point] = {}
    for p in points:
        if p.loss != p.loss or p.kl != p.kl:  # NaN: a run that diverged has no place on the curve
            continue
        if p.loss not in best or p.kl < best[p.loss].kl:
            best[p.loss] = p
    return [best[k] for k in sorted(best)]


def _lerp(a: float | None, b: float | None, w: float) -> float | None:
    return None if a is None or b is None else a + (b - a) * w


def at_loss(points: Sequence[Point], target: float) -> Matched:
    """The method's retention KL (and drop) at held-out loss ``target`` (module docstring for the rules)."""
    curve = _curve(points)
    if not curve or target < curve[0].loss:
        return Matched(target, False)
    if target > curve[-1].loss:
        low = min(curve, key=lambda p: p.kl)
        return Matched(target, True, low.kl, low.drop, "at most", (low.run,))
    for a, b in zip(curve, curve[1:]):
        if a.loss <= target <= b.loss:
            w = (target - a.loss) / (b.loss - a.loss)
            return Matched(target, True, _lerp(a.kl, b.kl, w), _lerp(a.drop, b.drop, w), "interpolated",
                           (a.run, b.run))
    # A single point whose loss is the target.
    return Matched(target, True, curve[0].kl, curve[0].drop, "interpolated", (curve[0].run,))


def matched_table(curves: dict[str, Sequence[Point]], reference_loss: float,
                  factors: Sequence[float] = FACTORS) -> dict[str, dict[float, Matched]]:
    """``{method: {factor: Matched}}``: each method's retention at ``factor x reference_loss`` (the
    reference is e2e's best held-out loss in the study's report)."""
    return {m: {f: at_loss(pts, f * reference_loss) for f in factors} for m, pts in curves.items()}
