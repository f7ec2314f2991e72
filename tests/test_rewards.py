"""Verifiable rewards on tricky strings (both ways), and loading reward functions by dotted path."""
from __future__ import annotations

import pytest

from lopt.eval.generation import extract_answer
from lopt.rewards import (RewardError, boxed_accuracy_reward, boxed_format_reward, completion_text,
                          extract_boxed, gsm8k_accuracy_reward, gsm8k_answer, gsm8k_correct,
                          gsm8k_format_reward, load_reward, math_answers_equal, math_verify_available,
                          math_verify_equal, normalize_math_answer, normalized_answers_equal, resolve_rewards)

# ----------------------------------------------------------------------------- GSM8K


@pytest.mark.parametrize("text, value", [
    ("#### 72", 72),
    ("Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips.\n#### 72", 72),
    ("She has 1,250 dollars left.\n#### $1,250", 1250),
    ("#### 1,000,000", 1_000_000),
    ("The answer is -5.", -5),
    ("#### -$12", -12),
    ("#### $-12", -12),
    ("#### 3.50", 3.5),
    ("#### .5", 0.5),
    ("#### 7/2", 3.5),
    ("so each gets 3/4 of a pie", 0.75),
    ("#### 18.\nThen 19 more words", 18),  # #### wins over a later number
    ("#### \nthe answer is 42", 42),  # nothing after ####: the last number
    ("x-1 = 4 so x is 5.", 5),  # '-' between tokens is not a sign
    ("It costs $5 per hour, so $40 in total.", 40),
    ("no digits here", None),
])
def test_gsm8k_answer(text, value):
    got = gsm8k_answer(text)
    assert (got is None) if value is None else got == pytest.approx(value)


@pytest.mark.parametrize("text", [
    "#### 72", "so 1,250.\n#### $1,250", "-5 apples", "#### 3.50 dollars", "x-1 = 4 so 5", "a $12 fee",
    "48/2 = 24 clips", "nothing", "#### 18.\n19", "temperatures of -3 and -7.",
])
def test_same_rule_as_lopt_eval_without_fractions(text):
    assert gsm8k_answer(text) == extract_answer(text)


@pytest.mark.parametrize("completion, reference, correct", [
    ("3 + 4 = 7\n#### 7", "7", True),
    ("#### 3.50", "3.5", True),
    ("The total is $1,234.", "1234", True),
    ("#### 7/2", "3.5", True),
    ("#### 72.", "Natalia sold 72 clips.\n#### 72", True),  # reference given as a full solution
    ("#### -4", "-4", True),
    ("#### 4", "-4", False),
    ("#### 71", "72", False),
    ("#### 7.2", "72", False),
    ("I don't know", "72", False),
    ("#### 72 and then 73", "73", False),  # the first number after #### is the answer
    ("", "0", False),
])
def test_gsm8k_correct(completion, reference, correct):
    assert gsm8k_correct(completion, reference) is correct


def test_gsm8k_rewards_take_strings_and_chat_messages():
    completions = ["#### 7", [{"role": "assistant", "content": "so 8\n#### 8"}], [{"role": "assistant", "content": "8"}],
                   {"role": "assistant", "content": "no"}]
    assert gsm8k_accuracy_reward(completions, answer=["7", "8", "8", "8"]) == [1.0, 1.0, 1.0, 0.0]
    assert gsm8k_format_reward(completions) == [1.0, 1.0, 0.0, 0.0]
    with pytest.raises(RewardError, match="'answer' column"):
        gsm8k_accuracy_reward(["#### 1"])


@pytest.mark.parametrize("text, ok", [
    ("Work...\n#### 42", True), ("#### -3", True), ("   ####  $1,000", True), ("#### .5", True),
    ("#### x", False), ("The answer is 42", False), ("####", False), ("## 42", False), ("text #### 42", False),
])
def test_gsm8k_format(text, ok):
    assert gsm8k_format_reward([text]) == [float(ok)]


# ----------------------------------------------------------------------------- boxed math


@pytest.mark.parametrize("text, content", [
    (r"so \boxed{5}.", "5"),
    (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),
    (r"first \boxed{1}, finally \boxed{ {2}+3 }", " {2}+3 "),  # last box wins, nested braces kept
    (r"\boxed{\left( 1, 2 \right)}", r"\left( 1, 2 \right)"),
    (r"$\boxed 5$", "5"),
    (r"\fbox{x}", "x"),
    (r"\boxed{\text{(B)}}", r"\text{(B)}"),
    (r"answer \boxed{2} then \boxed{unclosed", "2"),  # an unfinished box does not count
    ("no box here", None),
    (r"\boxed{", None),
])
def test_extract_boxed(text, content):
    assert extract_boxed(text) == content


# (prediction, reference) pairs that both checkers must judge alike; scripts/math_verify_agreement.py
# reads these lists to count how raw math-verify, lopt's normaliser and lopt's math-verify disagree.
EQUAL_PAIRS = [
    (r"\frac{1}{2}", "1/2"),
    (r"\frac{1}{2}", "0.5"),
    (r"\dfrac12", ".5"),
    (r"\tfrac{3}{4}", "0.75"),
    (r"-\frac{7}{2}", "-3.5"),
    (r"\left(1, 2\right)", "(1,2)"),
    (r"(\frac12, 2]", "(0.5, 2]"),
    (r"90^\circ", "90"),
    (r"90^{\circ}", "90"),
    ("90°", "90"),
    (r"\$5.00", "5"),
    (r"5\text{ cm}", "5"),
    (r"\text{(A)}", "(A)"),
    ("x = 3", "3"),
    ("1,000", "1000"),
    (r"1\,000", "1000"),
    (r"50\%", "50"),
    (r"\frac{\sqrt{3}}{2}", r"\frac{\sqrt3}{2}"),
    ("{5}", "5"),
    ("3.", "3"),
    (r"\pi", r"\pi"),
    (r"2 \sqrt{2}", r"2\sqrt{2}"),
    ("10.0", "10"),
]
UNEQUAL_PAIRS = [
    ("0.333", "1/3"),  # a rounded value is not the fraction
    ("2", "3"),
    ("", "0"),
    (None, "1"),
    ("2x", "2"),
    (r"\frac{1}{3}", r"\frac{1}{2}"),
    ("(1,2)", "(2,1)"),
    ("(1,2)", "[1,2]"),
    ("12", "1,2"),
    (r"\sqrt{2}", "2"),
    ("-5", "5"),
]
needs_math_verify = pytest.mark.skipif(not math_verify_available(), reason="math-verify is not installed")
CHECKERS = [pytest.param(normalized_answers_equal, id="lopt"),
            pytest.param(math_verify_equal, id="math-verify", marks=needs_math_verify)]


@pytest.mark.parametrize("check", CHECKERS)
@pytest.mark.parametrize("prediction, reference", EQUAL_PAIRS)
def test_math_answers_equal(check, prediction, reference):
    assert check(prediction, reference)
    assert check(reference, prediction)


@pytest.mark.parametrize("check", CHECKERS)
@pytest.mark.parametrize("prediction, reference", UNEQUAL_PAIRS)
def test_math_answers_not_equal(check, prediction, reference):
    assert not check(prediction, reference)


# Forms only math-verify reads (lopt's normaliser compares strings and plain numbers), and forms
# math-verify 0.9 reads wrongly that lopt rewrites first (clean_for_math_verify).
@needs_math_verify
@pytest.mark.parametrize("prediction, reference, equal", [
    # nested fractions
    (r"\frac{1}{1+\frac{1}{2}}", r"\frac{2}{3}", True),
    (r"\frac{\frac{3}{4}}{2}", "3/8", True),
    (r"\dfrac{1}{1+\dfrac{1}{3}}", "0.75", True),
    (r"\frac{1}{1+\frac{1}{2}}", r"\frac{3}{2}", False),
    # intervals and unions
    (r"\left[-2, 3\right)", "[-2,3)", True),
    (r"(3, \infty) \cup (-\infty, -1)", r"(-\infty,-1)\cup(3,\infty)", True),
    (r"(-\infty, -1] \cup [3, \infty)", r"(-\infty,-1)\cup(3,\infty)", False),
    ("(-2, 3]", "[-2, 3]", False),
    # units
    (r"12\ \text{meters}", "12", True),
    (r"7\mbox{ inches}", r"7\text{ inches}", True),
    (r"13\text{ cm}", "12", False),
    # \text{}
    (r"\textbf{(C)}", "C", True),
    (r"\mathrm{C}", r"\text{(C)}", True),
    (r"\text{Tuesday}", "Tuesday", True),
    (r"\text{(B)}", r"\text{(C)}", False),
    (r"\text{odd}", r"\text{even}", False),
    # percentages (the percent sign is dropped on both sides)
    (r"12.5\%", "12.5", True),
    (r"12.5 \%", r"12.5\%", True),
    ("12.5%", "12.5", True),
    ("0.125", r"12.5\%", False),
    (r"13.5\%", "12.5", False),
    # other equivalent forms
    (r"\sqrt{12}", r"2\sqrt{3}", True),
    (r"\pi/4", r"\frac{\pi}{4}", True),
    ("-(5)", "-5", True),
    (r"\{3, 1\}", r"\{1, 3\}", True),
    (r"4\times 10^{3}", "4000", True),
    # math-verify 0.9 alone reads "1\,000" as 1*0 and so would accept it for 0
    (r"1\,000", "0", False),
    (r"2{,}500", "2500", True),
])
def test_math_verify_on_tricky_strings(prediction, reference, equal):
    assert math_answers_equal(prediction, reference) is equal


def test_math_verify_handles_what_lopt_alone_does_not():
    import lopt.rewards as rewards

    assert rewards.boxed_checker() == ("math-verify" if math_verify_available() else "lopt")
    assert math_answers_equal(r"\sqrt{12}", r"2\sqrt{3}") is math_verify_available()
    assert not normalized_answers_equal(r"\sqrt{12}", r"2\sqrt{3}")


def test_fallback_without_math_verify_says_how_to_install_once(monkeypatch, capsys):
    import lopt.rewards as rewards

    monkeypatch.setattr(rewards, "_math_verify_cache", {"api": None})
    assert not rewards.math_verify_available()
    assert rewards.boxed_checker() == "lopt"
    assert math_answers_equal(r"\frac{1}{2}", "0.5")
    assert not math_answers_equal(r"\sqrt{12}", r"2\sqrt{3}")  # lopt's normaliser: a different string
    assert boxed_accuracy_reward([r"\boxed{\sqrt{12}}"], answer=[r"2\sqrt{3}"]) == [0.0]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "math-verify is not installed" in err[0] and 'pip install "lopt[math]"' in err[0]
    with pytest.raises(RewardError, match="math-verify is not installed"):
        rewards.math_verify_equal("1", "1")


@needs_math_verify
def test_boxed_reward_goes_through_math_verify():
    comps = [r"so \boxed{\sqrt{12}}", r"\boxed{\frac{1}{1+\frac{1}{2}}}", r"\boxed{4(x+6)}", r"\boxed{5}"]
    assert boxed_accuracy_reward(comps, answer=[r"2\sqrt{3}", r"$\boxed{\frac23}$", "4x+24", "6"]) == [1, 1, 1, 0]


def test_normalize_math_answer():
    assert normalize_math_answer(r"\left( \dfrac{1}{2}, 3 \right)") == "((1)/(2),3)"
    assert normalize_math_answer(r"x = \text{5 apples}.") == "5apples"


def test_boxed_rewards():
    comps = [r"so \boxed{\frac{1}{2}}", [{"role": "assistant", "content": r"\boxed{0.5}"}], r"\boxed{}", "0.5"]
    assert boxed_accuracy_reward(comps, answer=["0.5", r"It is $\boxed{\frac12}$", "0.5", "0.5"]) == [1, 1, 0, 0]
    assert boxed_format_reward(comps) == [1.0, 1.0, 0.0, 0.0]


def test_completion_text():
    assert completion_text("x") == "x"
    assert completion_text([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]) == "a"
    assert completion_text([{"role": "assistant", "content": [{"type": "text", "text": "p"}]}]) == "p"
    assert completion_text(None) == ""


# ----------------------------------------------------------------------------- loading rewards


def test_load_reward_by_dotted_path_and_file(tmp_path, monkeypatch):
    (tmp_path / "my_pkg").mkdir()
    (tmp_path / "my_pkg" / "__init__.py").write_text("")
    (tmp_path / "my_pkg" / "rw.py").write_text("class R:\n    @staticmethod\n    def f(completions, **kw):\n"
                                               "        return [1.0] * len(completions)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert load_reward("my_pkg.rw:R.f")(["a", "b"]) == [1.0, 1.0]
    assert load_reward("my_pkg.rw.R.f")(["a"]) == [1.0]
    assert load_reward(f"{tmp_path / 'my_pkg' / 'rw.py'}:R.f")(["a"]) == [1.0]
    assert load_reward("lopt.rewards:gsm8k_format_reward") is gsm8k_format_reward


def test_working_directory_is_importable(tmp_path, monkeypatch):
    (tmp_path / "cwd_rewards_mod.py").write_text("def r(completions, **kw):\n    return [2.0] * len(completions)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.path", [p for p in __import__("sys").path if p not in ("", str(tmp_path))])
    assert load_reward("cwd_rewards_mod:r")(["x"]) == [2.0]


@pytest.mark.parametrize("spec, match", [
    ("no_such_module_abc:fn", "cannot import 'no_such_module_abc' (ModuleNotFoundError"),
    ("lopt.rewards:nope", "'lopt.rewards' has no attribute 'nope'"),
    ("lopt.rewards:ANSWER_FORMATS", "is a tuple, not a function"),
    ("justaname", "expected a built-in name"),
    ("/nonexistent/file.py:fn", "file not found"),
    ("BROKEN:fn", "cannot import"),
])
def test_load_reward_errors_are_one_line(spec, match, tmp_path):
    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('boom\\nsecond line')\n")
    spec = spec.replace("BROKEN", str(broken))
    with pytest.raises(RewardError) as e:
        load_reward(spec)
    assert match in str(e.value) and "\n" not in str(e.value)


def test_resolve_rewards():
    assert resolve_rewards(["accuracy", "format"], "gsm8k") == [gsm8k_accuracy_reward, gsm8k_format_reward]
    assert resolve_rewards(["accuracy"], "boxed") == [boxed_accuracy_reward]
    with pytest.raises(RewardError, match="no reward given"):
        resolve_rewards([], "gsm8k")
    with pytest.raises(RewardError, match="unknown answer format"):
        resolve_rewards(["accuracy"], "latex")
