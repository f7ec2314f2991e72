"""How often do lopt's own \\boxed{} checker and math-verify disagree, and which one is right?

    python scripts/math_verify_agreement.py --n 500 --seed 0 [--show 3]

Generates NuminaMath-style (gold, prediction) answer pairs of known truth: each generator below
writes a gold answer and a prediction that is either an equivalent way of writing it (label
``equal``), a wrong answer (``different``), or a form graders differ on (``debatable``: 0.25 for
25%, a rounded pi). Three checkers judge every pair:

* ``lopt``: ``lopt.rewards.normalized_answers_equal`` (lopt's LaTeX normaliser, the fallback);
* ``mv``: math-verify as TRL's accuracy reward calls it (parse both, verify), on ``\\boxed{...}``;
* ``lopt+mv``: ``lopt.rewards.math_verify_equal`` (math-verify after ``clean_for_math_verify``).

Prints, per kind, how often lopt and mv disagree and which matched the label, the same for lopt and
lopt+mv, and a few disagreeing pairs per kind for judging by hand.
"""
from __future__ import annotations

import argparse
import random
import sys
from collections import Counter, defaultdict
from fractions import Fraction
from typing import Callable

Pair = tuple[str, str, str]  # gold, prediction, label


def _frac(f: Fraction, style: str = "frac") -> str:
    sign = "-" if f < 0 else ""
    a, b = abs(f.numerator), f.denominator
    return {"frac": f"{sign}\\frac{{{a}}}{{{b}}}", "dfrac": f"{sign}\\dfrac{{{a}}}{{{b}}}",
            "slash": f"{sign}{a}/{b}", "tight": f"{sign}\\frac{a}{b}" if a < 10 and b < 10 else f"{sign}\\frac{{{a}}}{{{b}}}"}[style]


def integers(r: random.Random) -> Pair:
    n = r.choice([r.randint(2, 99), r.randint(100, 999), r.randint(1000, 99999)])
    forms = [(str(n), "equal"), (f"{n}.0", "equal"), (f"x = {n}", "equal"), (f"\\${n}", "equal"),
             (f"{n:,}", "equal"), (f"{n}.", "equal"), (str(n + r.choice([-1, 1, 10])), "different"),
             (str(n * 10), "different")]
    if n >= 1000:
        forms += [(f"{n:,}".replace(",", "\\,"), "equal"), (f"{n:,}".replace(",", "{,}"), "equal")]
    p, lab = r.choice(forms)
    return str(n), p, lab


def negatives(r: random.Random) -> Pair:
    n = r.randint(1, 500)
    p, lab = r.choice([(f"-{n}", "equal"), (f"- {n}", "equal"), (f"-({n})", "equal"), (f"−{n}", "equal"),
                       (str(n), "different"), (f"-{n + 1}", "different")])
    return f"-{n}", p, lab


def fractions(r: random.Random) -> Pair:
    f = Fraction(r.randint(1, 30), r.choice([2, 3, 4, 5, 6, 7, 8, 9, 12, 16]))
    while f.denominator == 1:
        f = Fraction(r.randint(1, 30), 7)
    f = -f if r.random() < 0.2 else f
    k = r.randint(2, 4)
    forms = [(_frac(f, "dfrac"), "equal"), (_frac(f, "slash"), "equal"), (_frac(f, "tight"), "equal"),
             (f"{'-' if f < 0 else ''}\\frac{{{abs(f.numerator) * k}}}{{{f.denominator * k}}}", "equal"),
             (_frac(1 / f), "different"), (_frac(f + Fraction(1, f.denominator)), "different"),
             (_frac(-f), "different")]
    if f < 0:
        forms.append((f"\\frac{{-{abs(f.numerator)}}}{{{f.denominator}}}", "equal"))
    if 10 ** 6 % f.denominator == 0:  # terminating decimal
        forms.append((f"{float(f):g}", "equal"))
    else:
        forms.append((f"{float(f):.3f}", "different"))  # rounded
    p, lab = r.choice(forms)
    return _frac(f), p, lab


def nested_fractions(r: random.Random) -> Pair:
    a, b, c = r.randint(1, 9), r.randint(2, 9), r.randint(2, 9)
    kind = r.choice(["cont", "over"])
    if kind == "cont":  # 1 / (1 + 1/m) = m / (m + 1)
        gold, value = f"\\frac{{1}}{{1+\\frac{{1}}{{{b}}}}}", Fraction(b, b + 1)
    else:  # (a/b) / c
        gold, value = f"\\frac{{\\frac{{{a}}}{{{b}}}}}{{{c}}}", Fraction(a, b * c)
    p, lab = r.choice([(_frac(value), "equal"), (_frac(value, "slash"), "equal"), (gold.replace("\\frac", "\\dfrac"), "equal"),
                       (_frac(value + 1), "different"), (_frac(1 / value), "different")])
    if r.random() < 0.5:  # the reference is the simplified value, the prediction the nested form
        gold, p = (_frac(value), gold) if lab == "equal" else (_frac(value), p)
    return gold, p, lab


def intervals(r: random.Random) -> Pair:
    a = r.randint(-9, 5)
    b = a + r.randint(1, 9)
    lo, hi = r.choice("(["), r.choice(")]")
    gold = f"{lo}{a}, {b}{hi}"
    other_lo = "[" if lo == "(" else "("
    forms = [(f"{lo}{a},{b}{hi}", "equal"), (f"\\left{lo}{a}, {b}\\right{hi}", "equal"),
             (f"{other_lo}{a}, {b}{hi}", "different"), (f"{lo}{a}, {b + 1}{hi}", "different")]
    if r.random() < 0.3:
        gold = f"(-\\infty, {a}) \\cup ({b}, \\infty)"
        forms = [(f"(-\\infty,{a})\\cup({b},\\infty)", "equal"), (f"({b}, \\infty) \\cup (-\\infty, {a})", "equal"),
                 (f"(-\\infty, {a}] \\cup [{b}, \\infty)", "different"), (f"({a}, {b})", "different")]
    p, lab = r.choice(forms)
    return gold, p, lab


UNITS = ["cm", "meters", "inches", "feet", "dollars", "square units", "km", "degrees", "hours"]


def units(r: random.Random) -> Pair:
    n, u = r.randint(2, 500), r.choice(UNITS)
    forms = [(f"{n}\\text{{ {u}}}", "equal"), (f"{n} \\text{{ {u}}}", "equal"), (f"{n}\\mbox{{ {u}}}", "equal"),
             (f"{n}\\ \\text{{{u}}}", "equal"), (f"{n + 1}\\text{{ {u}}}", "different")]
    p, lab = r.choice(forms)
    gold = str(n) if r.random() < 0.7 else f"{n}\\text{{ {u}}}"
    if gold != str(n) and r.random() < 0.5:
        p, lab = str(n), "equal"
    return gold, p, lab


WORDS = ["Tuesday", "even", "odd", "yes", "no", "Alice", "blue", "right"]


def text_answers(r: random.Random) -> Pair:
    if r.random() < 0.5:
        c = r.choice("ABCDE")
        other = r.choice([x for x in "ABCDE" if x != c])
        gold = r.choice([f"\\text{{({c})}}", f"\\textbf{{({c})}}", f"({c})", c])
        p, lab = r.choice([(c, "equal"), (f"({c})", "equal"), (f"\\text{{{c}}}", "equal"), (f"\\mathrm{{{c}}}", "equal"),
                           (f"\\text{{({other})}}", "different"), (other, "different")])
        return gold, p, lab
    w = r.choice(WORDS)
    other = r.choice([x for x in WORDS if x != w])
    p, lab = r.choice([(w, "equal"), (f"\\text{{{w}}}", "equal"), (f"\\textrm{{{w}}}", "equal"),
                       (f"\\text{{{other}}}", "different"), (other, "different")])
    return f"\\text{{{w}}}", p, lab


def percentages(r: random.Random) -> Pair:
    n = r.choice([5, 10, 12.5, 20, 25, 30, 40, 50, 60, 75, 80, 150])
    s = f"{n:g}"
    gold = r.choice([f"{s}\\%", s])
    p, lab = r.choice([(f"{s}\\%", "equal"), (s, "equal"), (f"{s} \\%", "equal"), (f"{s}%", "equal"),
                       (f"{n / 100:g}", "debatable"), (f"{n + 5:g}\\%", "different")])
    return gold, p, lab


def roots(r: random.Random) -> Pair:
    a, b = r.randint(2, 5), r.choice([2, 3, 5, 6, 7])
    gold = f"{a}\\sqrt{{{b}}}"
    p, lab = r.choice([(f"\\sqrt{{{a * a * b}}}", "equal"), (f"{a} \\sqrt {b}", "equal"), (f"{a}\\sqrt{b}", "equal"),
                       (f"\\sqrt{{{b}}} \\cdot {a}", "equal"), (f"{b}\\sqrt{{{a}}}" if a != b else f"{a + 1}\\sqrt{{{b}}}", "different"),
                       (f"{a * a * b}", "different")])
    if r.random() < 0.3:
        gold = "\\frac{\\sqrt{2}}{2}"
        p, lab = r.choice([("\\frac{1}{\\sqrt{2}}", "equal"), ("\\sqrt{2}/2", "equal"), ("\\frac{\\sqrt2}2", "equal"),
                           ("\\frac{\\sqrt{3}}{2}", "different"), ("0.707", "different")])
    return gold, p, lab


def pi_answers(r: random.Random) -> Pair:
    k = r.randint(2, 9)
    if r.random() < 0.5:
        gold = f"{k}\\pi"
        p, lab = r.choice([(f"{k} \\pi", "equal"), (f"\\pi \\cdot {k}", "equal"), (f"{k}\\cdot\\pi", "equal"),
                           (f"{k + 1}\\pi", "different"), ("\\pi", "different"), (f"{k * 3.14159:.2f}", "debatable")])
    else:
        gold = f"\\frac{{\\pi}}{{{k}}}"
        p, lab = r.choice([(f"\\pi/{k}", "equal"), (f"\\frac{{1}}{{{k}}}\\pi", "equal"), (f"\\dfrac{{\\pi}}{{{k}}}", "equal"),
                           (f"\\frac{{{k}}}{{\\pi}}", "different"), (f"\\frac{{\\pi}}{{{k + 1}}}", "different")])
    return gold, p, lab


def algebra(r: random.Random) -> Pair:
    a, b = r.randint(1, 9), r.randint(1, 9)
    if r.random() < 0.5:
        gold = f"x^2+{2 * a}x+{a * a}"
        p, lab = r.choice([(f"(x+{a})^2", "equal"), (f"x^2 + {2 * a}x + {a * a}", "equal"), (f"{a * a}+{2 * a}x+x^2", "equal"),
                           (f"(x-{a})^2", "different"), (f"x^2+{2 * a}x", "different")])
    else:
        gold = f"{a}x+{a * b}"
        p, lab = r.choice([(f"{a}(x+{b})", "equal"), (f"{a * b}+{a}x", "equal"), (f"y = {a}x+{a * b}", "equal"),
                           (f"{a}x+{b}", "different") if b != a * b else (f"{a + 1}x+{a * b}", "different")])
    return gold, p, lab


def tuples_sets(r: random.Random) -> Pair:
    a, b = r.randint(-9, 9), r.randint(-9, 9)
    while b == a:
        b = r.randint(-9, 9)
    if r.random() < 0.5:
        gold = f"({a}, {b})"
        p, lab = r.choice([(f"({a},{b})", "equal"), (f"\\left({a}, {b}\\right)", "equal"), (f"({b}, {a})", "different"),
                           (f"({a}, {b + 1})", "different")])
    else:
        gold = f"\\{{{a}, {b}\\}}"
        p, lab = r.choice([(f"\\{{{b}, {a}\\}}", "equal"), (f"{a}, {b}", "equal"), (f"\\{{{a}, {b + 1}\\}}", "different")])
    return gold, p, lab


def degrees_sci(r: random.Random) -> Pair:
    if r.random() < 0.5:
        n = r.choice([30, 45, 60, 90, 120, 135, 150])
        p, lab = r.choice([(f"{n}^\\circ", "equal"), (f"{n}^{{\\circ}}", "equal"), (f"{n}°", "equal"), (str(n), "equal"),
                           (f"{n + 15}^\\circ", "different")])
        return r.choice([f"{n}^\\circ", str(n)]), p, lab
    m, e = r.randint(2, 9), r.randint(3, 6)
    p, lab = r.choice([(f"{m}\\times 10^{{{e}}}", "equal"), (f"{m} \\cdot 10^{e}", "equal"), (f"{m}e{e}", "debatable"),
                       (f"{m}\\times 10^{{{e + 1}}}", "different")])
    return str(m * 10 ** e), p, lab


KINDS: dict[str, Callable[[random.Random], Pair]] = {
    "integers": integers, "negatives": negatives, "fractions": fractions, "nested fractions": nested_fractions,
    "intervals": intervals, "units": units, "text": text_answers, "percentages": percentages, "sqrt": roots,
    "pi": pi_answers, "algebraic forms": algebra, "tuples/sets": tuples_sets, "degrees/scientific": degrees_sci,
}


def generate(n: int, seed: int) -> list[tuple[str, str, str, str]]:
    """``n`` (kind, gold, prediction, label) rows, kinds in turn."""
    r = random.Random(seed)
    names = list(KINDS)
    return [(names[i % len(names)], *KINDS[names[i % len(names)]](r)) for i in range(n)]


def trl_style_math_verify(prediction: str, gold: str) -> bool:
    """math-verify as TRL's accuracy_reward calls it (default parse configs, verify(gold, pred)),
    on the boxed answers, without lopt's cleaning."""
    from math_verify import parse, verify

    g = parse("\\boxed{" + gold + "}")
    return bool(g) and bool(verify(g, parse("\\boxed{" + prediction + "}")))


def checkers_for_tests() -> dict[str, Callable[[str, str], bool]]:
    from lopt.rewards import math_verify_equal, normalized_answers_equal

    return {"lopt": normalized_answers_equal, "mv": trl_style_math_verify, "lopt+mv": math_verify_equal}


def existing_tests(checkers: dict[str, Callable[[str, str], bool]]) -> None:
    """Disagreements on the (prediction, reference) pairs of tests/test_rewards.py."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "tests" / "test_rewards.py"
    spec = importlib.util.spec_from_file_location("lopt_test_rewards", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    pairs = [(p, r, True) for p, r in module.EQUAL_PAIRS] + [(p, r, False) for p, r in module.UNEQUAL_PAIRS]
    pairs += [(r, p, True) for p, r in module.EQUAL_PAIRS]  # both directions, as the test checks
    pairs = [(p, r, eq) for p, r, eq in pairs if p is not None]
    print(f"tests/test_rewards.py: {len(pairs)} (prediction, reference) pairs")
    for name, f in checkers.items():
        wrong = [(p, r) for p, r, eq in pairs if p is not None and f(p, r) != eq]
        print(f"  {name:8} wrong on {len(wrong)}: " + ", ".join(f"{p!r} vs {r!r}" for p, r in wrong))
    print()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--show", type=int, default=3, help="disagreeing pairs shown per kind")
    ns = p.parse_args(argv)
    existing_tests(checkers_for_tests())
    rows = generate(ns.n, ns.seed)
    checkers = checkers_for_tests()
    verdicts = [{k: f(pred, gold) for k, f in checkers.items()} for _, gold, pred, _ in rows]
    labels = Counter(r[3] for r in rows)
    print(f"{len(rows)} pairs (seed {ns.seed}): " + ", ".join(f"{v} {k}" for k, v in labels.items()))
    for name in checkers:
        judged = [(v[name], lab) for v, (_, _, _, lab) in zip(verdicts, rows) if lab != "debatable"]
        right = sum((verdict and lab == "equal") or (not verdict and lab == "different") for verdict, lab in judged)
        false_pos = sum(verdict and lab == "different" for verdict, lab in judged)
        false_neg = sum(not verdict and lab == "equal" for verdict, lab in judged)
        debatable = [v[name] for v, r in zip(verdicts, rows) if r[3] == "debatable"]
        print(f"{name:8} right on {right}/{len(judged)} labelled pairs; false accept {false_pos}, false reject "
              f"{false_neg}; accepts {sum(debatable)}/{len(debatable)} debatable pairs")
    for a, b in (("lopt", "mv"), ("lopt", "lopt+mv")):
        print(f"\n### {a} vs {b}\n\n| kind | pairs | disagree | {a} right | {b} right | debatable |\n|---|---|---|---|---|---|")
        shown: dict[str, list[str]] = defaultdict(list)
        total = Counter()
        for kind in KINDS:
            idx = [i for i, r in enumerate(rows) if r[0] == kind]
            dis = [i for i in idx if verdicts[i][a] != verdicts[i][b]]
            a_right = sum(rows[i][3] != "debatable" and verdicts[i][a] == (rows[i][3] == "equal") for i in dis)
            deb = sum(rows[i][3] == "debatable" for i in dis)
            total.update({"pairs": len(idx), "dis": len(dis), "a": a_right, "b": len(dis) - a_right - deb, "deb": deb})
            print(f"| {kind} | {len(idx)} | {len(dis)} | {a_right} | {len(dis) - a_right - deb} | {deb} |")
            for i in dis[: ns.show]:
                _, gold, pred, lab = rows[i]
                shown[kind].append(f"gold `{gold}` pred `{pred}` ({lab}): {a}={verdicts[i][a]} {b}={verdicts[i][b]}")
        print(f"| all | {total['pairs']} | {total['dis']} | {total['a']} | {total['b']} | {total['deb']} |")
        for kind, lines in shown.items():
            print(f"- {kind}: " + "; ".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
