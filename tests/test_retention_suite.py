"""lopt.eval.benchmarks / lopt.eval.suite: the retention suite against a plain one-item-at-a-time
scorer, the file formats, WinoGrande's partial scoring, LAMBADA's last word, and bad inputs."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import make_tiny_model, make_tokenizer
from lopt.eval import benchmarks as bm
from lopt.eval import suite
from lopt.eval import EvalError, mc_loglikelihoods


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def llama():
    return make_tiny_model("llama", seed=1).eval()


# --------------------------------------------------------------------------- the plain reference


def plain_score(model, tok, context: str, continuation: str) -> tuple[float, bool]:
    """lm-evaluation-harness's loglikelihood written out for one request: trailing whitespace of the
    context moves to the continuation, the continuation's tokens are those of context+continuation
    after the context's, one unpadded forward of the whole sequence; (sum of log-softmax at the
    continuation tokens, whether each of them is the argmax)."""
    stripped = context.rstrip()
    continuation = context[len(stripped):] + continuation
    ctx = tok(stripped, add_special_tokens=False)["input_ids"]
    whole = tok(stripped + continuation, add_special_tokens=False)["input_ids"]
    cont = whole[len(ctx):]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ctx + cont])).logits[0].float(), dim=-1)
    rows = logp[len(ctx) - 1: len(ctx) - 1 + len(cont)]
    ll = sum(float(rows[k, t]) for k, t in enumerate(cont))
    greedy = all(int(rows[k].argmax()) == t for k, t in enumerate(cont))
    return ll, greedy


def first_max(values):
    return values.index(max(values))


def reference(kind: str, path: Path, model, tok) -> list[dict]:
    """Each row of a benchmark file scored on its own, the requests spelled out from the task
    definitions (arc_easy.yaml, piqa.yaml, preprocess_winogrande.py, lambada_openai.yaml)."""
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    out = []
    if kind == "piqa":
        labels = [int(x) for x in (path.parent / f"{path.stem}-labels.lst").read_text().split()]
    for n, row in enumerate(rows):
        if kind in ("arc-easy", "arc-challenge", "piqa"):
            if kind == "piqa":
                context, choices, gold = f"Question: {row['goal']}\nAnswer:", [row["sol1"], row["sol2"]], labels[n]
            else:
                q = row["question"]
                context, choices = f"Question: {q['stem']}\nAnswer:", [c["text"] for c in q["choices"]]
                gold = [c["label"] for c in q["choices"]].index(row["answerKey"])
            lls = [plain_score(model, tok, context, " " + c)[0] for c in choices]
            norm = [ll / len(c) for ll, c in zip(lls, choices)]
            out.append({"loglik": lls, "acc": int(first_max(lls) == gold),
                        "acc_norm": int(first_max(norm) == gold)})
        elif kind == "winogrande":
            s = row["sentence"]
            i = s.index("_")
            target = " " + s[i + 1:].strip()
            lls = [plain_score(model, tok, s[:i] + opt, target)[0] for opt in (row["option1"], row["option2"])]
            out.append({"loglik": lls, "acc": int(first_max(lls) == int(row["answer"]) - 1)})
        else:  # lambada
            words = row["text"].split(" ")
            ll, greedy = plain_score(model, tok, " ".join(words[:-1]), " " + words[-1])
            out.append({"loglik": ll, "acc": int(greedy)})
    return out


# --------------------------------------------------------------------------- tiny benchmark files


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def arc_row(i, stem, texts, labels, key):
    return {"id": f"q{i}", "question": {"stem": stem, "choices": [{"text": t, "label": lab}
                                                                   for t, lab in zip(texts, labels)]},
            "answerKey": key}


ARC_ROWS = [
    arc_row(0, "Tom has 3 apples and buys 4 more. How many apples does he have?",
            ["7", "12 apples", "seven", "the quick brown fox"], "ABCD", "A"),
    arc_row(1, "Which is a fox?", ["the quick brown one", "naïve café", "a lazy dog"], "ABC", "C"),
    arc_row(2, "What is 0 + 1?", ["1", "2", "3", "4"], ["1", "2", "3", "4"], "3"),  # digit labels
    arc_row(3, "Pick the last.", ["user", "assistant", "system", "input", "output response"], "ABCDE", "E"),
    arc_row(4, "How many?", ["1", "2 2", "3 3 3"], ["1", "2", "3"], "1"),
]
PIQA_ROWS = [
    {"goal": "How do I ready a guinea pig cage?", "sol1": "Add bedding made of paper strips.",
     "sol2": "Add bedding made of jeans."},
    {"goal": "dresser", "sol1": "replace drawer with bobby pin ", "sol2": "finish, woodgrain with  bobby pin "},
    {"goal": "To count apples", "sol1": "use 0 1 2 3", "sol2": "use the fox"},
]
PIQA_LABELS = [0, 1, 1]
WINO_ROWS = [
    {"qID": "w1", "sentence": "The trophy doesn't fit into the brown suitcase because _ is too large.",
     "option1": "the trophy", "option2": "the suitcase", "answer": "1"},
    {"qID": "w2", "sentence": "Sarah was a much better surgeon than Maria so _ always got the easier cases.",
     "option1": "Sarah", "option2": "Maria", "answer": "2"},
    {"qID": "w3", "sentence": "_ jumps over the lazy dog.", "option1": "The fox", "option2": "Tom",
     "answer": "1"},  # the blank first: the contexts share no token
    {"qID": "w4", "sentence": "Tom gave the apple to the fox because _ was hungry.", "option1": "Tom",
     "option2": "the fox", "answer": "2"},
]
LAMBADA_ROWS = [
    {"text": "the quick brown fox jumps over the lazy dog"},
    {"text": "Tom has 3 apples and buys 4 more. He has zyxwvutsr"},  # last word: several tokens
    {"text": "user assistant system  instruction"},  # double space: the context ends with " "
    {"text": "the answer is\n\n#### 7. the quick brown\nfox"},  # a newline inside the last piece
    {"text": "naïve café au lait"},
]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("bench")
    (d / "valid-labels.lst").write_text("".join(f"{x}\n" for x in PIQA_LABELS))
    return {"arc-easy": write_jsonl(d / "ARC-Easy-Test.jsonl", ARC_ROWS),
            "arc-challenge": write_jsonl(d / "ARC-Challenge-Test.jsonl", ARC_ROWS[::-1]),
            "piqa": write_jsonl(d / "valid.jsonl", PIQA_ROWS),
            "winogrande": write_jsonl(d / "dev.jsonl", WINO_ROWS),
            "lambada": write_jsonl(d / "lambada_test.jsonl", LAMBADA_ROWS)}


# --------------------------------------------------------------------------- equality with the reference


@pytest.mark.parametrize("kind", suite.RETENTION_KINDS)
def test_every_kind_equals_the_plain_scorer(kind, files, tok, llama):
    ref = reference(kind, files[kind], llama, tok)
    for batch_size in (1, 3, 16):  # unbatched, batched with ragged lengths, the whole file at once
        res = suite.run_benchmark(kind, llama, tok, files[kind], batch_size=batch_size)
        assert res["n"] == len(ref) and len(res["items"]) == len(ref)
        for got, want in zip(res["items"], ref):
            # 1e-6, absolute or relative: a sum over many tokens carries fp32 rounding of each
            assert got["loglik"] == pytest.approx(want["loglik"], abs=1e-6, rel=1e-6)
            for name in suite.METRICS[kind]:
                if name != "perplexity":
                    assert got[name] == want[name], (kind, batch_size, name)
        for name in suite.METRICS[kind]:
            if name == "perplexity":
                want = math.exp(-sum(r["loglik"] for r in ref) / len(ref))
                assert res["perplexity"] == pytest.approx(want, rel=1e-6)
            else:
                vals = [r[name] for r in ref]
                mean = sum(vals) / len(vals)
                se = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1) / len(vals))
                assert res[name] == pytest.approx(mean) and res[f"{name}_stderr"] == pytest.approx(se)


def _greedy_words(model, tok, prompts) -> list[tuple[str, int]]:
    """``(prompt + word, tokens in word)`` where ``word`` (a space, then no space) is the model's
    own greedy continuation of ``prompt`` and tokenizes back to exactly those tokens."""
    found = []
    for prompt in prompts:
        ids = tok(prompt, add_special_tokens=False)["input_ids"]
        gen: list[int] = []
        with torch.no_grad():
            for _ in range(3):
                gen.append(int(model(torch.tensor([ids + gen])).logits[0, -1].argmax()))
        for k in (1, 2, 3):
            word = tok.decode(gen[:k])
            if (word.startswith(" ") and " " not in word[1:] and len(word) > 1
                    and tok(prompt + word, add_special_tokens=False)["input_ids"] == ids + gen[:k]):
                found.append((prompt + word, k))
    return found


def test_lambada_greedy_match_is_acc_one(tok, tmp_path):
    """Texts ending in the model's own greedy continuation (one and several tokens) score acc 1;
    the same texts with the last word changed do not."""
    prompts = ["the quick brown fox jumps over the", "Tom has 3 apples and", "user assistant system",
               "Question: Tom has", "0 1 2 3 4 5", "the lazy dog", "Answer: 3 + 4 =", "problem solution"]
    # A tiny tied model mostly repeats its last token; an untied one continues with words.
    for seed in range(8):
        model = make_tiny_model("llama", tie=False, seed=seed).eval()
        texts = _greedy_words(model, tok, prompts)
        if any(k >= 2 for _, k in texts):
            break
    else:
        pytest.fail("no multi-token greedy word found for any seed; change the prompts")
    rows = [{"text": t} for t, _ in texts] + [{"text": t + "zq"} for t, _ in texts]
    path = write_jsonl(tmp_path / "l.jsonl", rows)
    res = suite.run_benchmark("lambada", model, tok, path, batch_size=4)
    accs = [it["acc"] for it in res["items"]]
    assert accs[: len(texts)] == [1] * len(texts)
    assert accs == [r["acc"] for r in reference("lambada", path, model, tok)]
    assert res["acc"] == pytest.approx(sum(accs) / len(accs)) and 0 < res["acc"] < 1


def test_mc_loglikelihoods_return_greedy_matches_plain(tok, llama):
    requests = [("the quick brown fox", [" jumps over", " 0 1 2", "x"]),
                ("Question: Tom has 3 apples\nAnswer: ", ["7", "3 + 4 = 7"])]
    plain = mc_loglikelihoods(llama, tok, requests, batch_size=2)
    both = mc_loglikelihoods(llama, tok, requests, batch_size=2, return_greedy=True)
    for (ctx, conts), p, b in zip(requests, plain, both):
        assert [ll for ll, _ in b] == p  # the same numbers as without the option
        for cont, (ll, greedy) in zip(conts, b):
            want_ll, want_greedy = plain_score(llama, tok, ctx, cont)
            assert ll == pytest.approx(want_ll, abs=1e-6, rel=1e-6) and greedy == want_greedy


# --------------------------------------------------------------------------- formats


def test_arc_label_formats(files):
    docs = bm.load_arc(files["arc-easy"])
    assert [d.gold for d in docs] == [0, 2, 2, 4, 0]  # A of ABCD, C of ABC, "3" of 1-4, E of A-E, "1"
    assert docs[2].continuations == [" 1", " 2", " 3", " 4"]
    assert docs[0].contexts == ["Question: Tom has 3 apples and buys 4 more. How many apples does he "
                                "have?\nAnswer:"]


def test_limit_takes_the_first_rows_in_file_order(files, tok, llama):
    assert [d.id for d in bm.load_arc(files["arc-challenge"], limit=2)] == ["q4", "q3"]
    res = suite.run_benchmark("piqa", llama, tok, files["piqa"], limit=2)
    assert res["n"] == 2 and [it["id"] for it in res["items"]] == ["1", "2"]
    assert [it["gold"] for it in res["items"]] == PIQA_LABELS[:2]


def test_acc_norm_divides_by_characters_not_bytes():
    doc = bm.Doc(id="x", contexts=["c"], continuations=[" é", " ab"], choices=["é", "ab"], gold=1)
    # per character: -1.1/1 < -2/2 picks "ab"; per UTF-8 byte (-1.1/2 > -2/2) would pick "é"
    rec = bm.item_scores(doc, [(-1.1, False), (-2.0, False)])
    assert rec["pred"] == 0 and rec["pred_norm"] == 1 and rec["acc_norm"] == 1


def test_winogrande_partial_scoring_hand_computed(files, tok, llama):
    contexts, cont = bm.winogrande_requests(WINO_ROWS[0]["sentence"], "the trophy", "the suitcase")
    assert contexts == ["The trophy doesn't fit into the brown suitcase because the trophy",
                        "The trophy doesn't fit into the brown suitcase because the suitcase"]
    assert cont == " is too large."
    # the two options share one scorer item: the common token prefix is the context, each option's
    # own tokens are run but not scored, and the continuation is scored after them
    items, slots = bm._token_items(tok, bm.load_winogrande(files["winogrande"]))
    first = items[slots[0][0][0]]
    assert slots[0] == [(0, 0), (0, 1)] and len(first.ctx) > 5 and all(s > 0 for s in first.skips)
    cont_ids = tok(contexts[0] + cont, add_special_tokens=False)["input_ids"]
    assert first.ctx + first.conts[0] == cont_ids
    assert len(slots[2]) == 2 and slots[2][0][0] != slots[2][1][0]  # no shared token: two items
    res = suite.run_benchmark("winogrande", llama, tok, files["winogrande"], limit=1, batch_size=2)
    lls = [plain_score(llama, tok, c, " is too large.")[0] for c in contexts]
    # "full" scoring (the option and the rest given the text before the blank) is another number
    before = "The trophy doesn't fit into the brown suitcase because "
    full = [plain_score(llama, tok, before, opt + " is too large.")[0] for opt in ("the trophy", "the suitcase")]
    item = res["items"][0]
    assert item["loglik"] == pytest.approx(lls, abs=1e-6, rel=1e-6)
    assert item["loglik"][0] != pytest.approx(full[0], abs=1e-3)
    assert item["pred"] == first_max(lls) and item["acc"] == int(first_max(lls) == 0)


def test_lambada_last_word(tok):
    assert bm.lambada_split("a b  c") == ("a b ", " c")
    assert bm.lambada_split("one two\nthree") == ("one", " two\nthree")
    docs = bm.load_lambada(write_jsonl(Path(__import__("tempfile").mkdtemp()) / "l.jsonl", LAMBADA_ROWS))
    assert [d.continuations[0] for d in docs] == [" dog", " zyxwvutsr", " instruction", " brown\nfox",
                                                  " lait"]
    items, _ = bm._token_items(tok, docs)
    word = tok(" zyxwvutsr", add_special_tokens=False)["input_ids"]
    bare = tok("zyxwvutsr", add_special_tokens=False)["input_ids"]
    assert len(items[1].conts[0]) > 1 and items[1].conts[0] == word != bare  # the space is scored
    # "system  instruction": the context's trailing space moves into the continuation
    ctx = tok("user assistant system", add_special_tokens=False)["input_ids"]
    whole = tok("user assistant system  instruction", add_special_tokens=False)["input_ids"]
    assert items[2].ctx == ctx and items[2].conts[0] == whole[len(ctx):]


# --------------------------------------------------------------------------- suite, comparison, tables


def test_run_retention_macro_and_table(files, tok, llama):
    res = suite.run_retention(llama, tok, paths=files, limit=3, batch_size=4)
    assert list(res["tasks"]) == list(suite.RETENTION_KINDS)
    prim = [res["tasks"][k][suite.PRIMARY[k]] for k in suite.RETENTION_KINDS]
    ses = [res["tasks"][k][suite.PRIMARY[k] + "_stderr"] for k in suite.RETENTION_KINDS]
    assert res["macro"]["value"] == pytest.approx(sum(prim) / 5)
    assert res["macro"]["stderr"] == pytest.approx(math.sqrt(sum(s * s for s in ses)) / 5)
    assert all(r["n"] == 3 for r in res["tasks"].values())
    table = suite.format_retention_table(res)
    assert table.count("\n") == 2 + 5 and "macro average" in table and "±" in table
    json.dumps(res)  # the per-item output is JSON-ready


def test_paired_difference():
    a = [{"id": str(i), "acc": v} for i, v in enumerate([1, 0, 1, 1, 0])]
    b = [{"id": str(i), "acc": v} for i, v in enumerate([1, 1, 0, 1, 1])][::-1]  # matched by id
    d = suite.paired_difference(a, b)
    diffs = [0, 1, -1, 0, 1]
    mean = sum(diffs) / 5
    assert d["delta"] == pytest.approx(mean) and d["n"] == 5
    assert d["stderr"] == pytest.approx(math.sqrt(sum((x - mean) ** 2 for x in diffs) / 4 / 5))
    assert suite.paired_difference([1, 0, 1], [1, 1, 1])["delta"] == pytest.approx(1 / 3)
    with pytest.raises(EvalError, match="same items"):
        suite.paired_difference(a, b[:4])
    with pytest.raises(EvalError, match="ids differ"):
        suite.paired_difference(a, [dict(x, id="z" + x["id"]) for x in b])
    base = {"tasks": {"piqa": {"items": [{"id": "1", "acc_norm": 0}, {"id": "2", "acc_norm": 1}]}}}
    tuned = {"tasks": {"piqa": {"items": [{"id": "1", "acc_norm": 1}, {"id": "2", "acc_norm": 1}]}}}
    diff = suite.retention_differences(base, tuned)
    assert diff["tasks"]["piqa"]["delta"] == pytest.approx(0.5) and diff["macro"]["delta"] == pytest.approx(0.5)
    assert "| piqa | acc_norm | 2 | 50.0 | 100.0 | +50.0 ± 50.0 |" in suite.format_differences_table(diff)


# --------------------------------------------------------------------------- bad inputs


def _one_line_error(fn, *match):
    with pytest.raises(EvalError) as exc:
        fn()
    msg = str(exc.value)
    assert "\n" not in msg, msg
    for m in match:
        assert m in msg, msg
    return msg


def test_bad_inputs_give_one_line_errors(tmp_path, files):
    missing = tmp_path / "nope.jsonl"
    _one_line_error(lambda: suite.resolve_path("arc-easy", missing), "file not found", "nope.jsonl")
    _one_line_error(lambda: bm.load_winogrande(missing), "not found")
    _one_line_error(lambda: suite.resolve_path("hellaswag"), "unknown benchmark")
    # wrong columns: an ARC file read as PIQA / WinoGrande / LAMBADA, PIQA read as ARC
    (tmp_path / "ARC-labels.lst").write_text("0\n")
    arc_as_piqa = write_jsonl(tmp_path / "ARC.jsonl", ARC_ROWS)
    _one_line_error(lambda: bm.load_piqa(arc_as_piqa), "ARC.jsonl line 1", "'goal'", "PIQA")
    _one_line_error(lambda: bm.load_winogrande(files["arc-easy"]), "line 1", "'sentence'")
    _one_line_error(lambda: bm.load_lambada(files["piqa"]), "line 1", "'text'")
    _one_line_error(lambda: bm.load_arc(files["piqa"]), "line 1", "question.stem")
    # PIQA: labels file missing, shorter than the data, longer, a bad label
    lone = write_jsonl(tmp_path / "dev.jsonl", PIQA_ROWS)
    _one_line_error(lambda: suite.resolve_path("piqa", lone), "labels file not found", "dev-labels.lst")
    _one_line_error(lambda: bm.load_piqa(lone), "labels file not found")
    (tmp_path / "dev-labels.lst").write_text("0\n1\n")
    _one_line_error(lambda: bm.load_piqa(lone), "dev-labels.lst has 2 labels", "line 3")
    assert len(bm.load_piqa(lone, limit=2)) == 2  # enough labels for the rows asked for
    (tmp_path / "dev-labels.lst").write_text("0\n1\n1\n0\n")
    _one_line_error(lambda: bm.load_piqa(lone), "has 4 labels", "3 rows")
    (tmp_path / "dev-labels.lst").write_text("0\n2\n1\n")
    _one_line_error(lambda: bm.load_piqa(lone), "dev-labels.lst line 2", "'2'")
    # ARC: an answer key that is none of the labels; WinoGrande: bad answer, no blank
    bad_key = write_jsonl(tmp_path / "arc_bad.jsonl", [arc_row(0, "Q?", ["a", "b"], "AB", "C")])
    _one_line_error(lambda: bm.load_arc(bad_key), "arc_bad.jsonl line 1", "answerKey 'C'")
    bad_answer = write_jsonl(tmp_path / "w.jsonl", [dict(WINO_ROWS[0], answer=3)])
    _one_line_error(lambda: bm.load_winogrande(bad_answer), "w.jsonl line 1", "answer 3")
    no_blank = write_jsonl(tmp_path / "w2.jsonl", [dict(WINO_ROWS[0], sentence="no blank here")])
    _one_line_error(lambda: bm.load_winogrande(no_blank), "no '_'")
    not_json = tmp_path / "broken.jsonl"
    not_json.write_text('{"text": "a b"}\n{"text": \n')
    _one_line_error(lambda: bm.load_lambada(not_json), "broken.jsonl line 2", "not valid JSON")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    _one_line_error(lambda: suite.run_benchmark("lambada", None, None, empty), "no rows")
    _one_line_error(lambda: suite.run_retention(None, None, paths={"mmlu": missing}), "no retention task")
    _one_line_error(lambda: suite.run_benchmark("retention", None, None, missing), "takes no path")


def test_default_files_come_from_the_data_folder_given_never_a_guess(tmp_path, monkeypatch):
    monkeypatch.delenv("LOPT_DATA_DIR", raising=False)
    msg = _one_line_error(lambda: suite.resolve_path("arc-easy"), "give --data-dir DIR or set LOPT_DATA_DIR",
                          "arc-easy:PATH")
    assert "shared" not in msg
    # a folder without the file: an error naming where it looked, no fall-back
    _one_line_error(lambda: suite.resolve_path("lambada", None, tmp_path), str(tmp_path / "lambada"),
                    "not found", "--data-dir")
    monkeypatch.setenv("LOPT_DATA_DIR", str(tmp_path / "nowhere"))
    _one_line_error(lambda: suite.resolve_path("lambada"), "LOPT_DATA_DIR", "no such folder")
    # --data-dir wins over the environment
    folder = tmp_path / "data"
    (folder / "arc").mkdir(parents=True)
    write_jsonl(folder / "arc" / "ARC-Easy-Test.jsonl", ARC_ROWS)
    assert suite.resolve_path("arc-easy", None, folder) == folder / "arc" / "ARC-Easy-Test.jsonl"


def test_registry_defaults_point_at_the_shared_data(shared_data):
    assert set(suite.TASKS) == set(suite.RETENTION_KINDS) | {"retention"}
    for kind in suite.RETENTION_KINDS:
        assert suite.resolve_path(kind, None, shared_data).is_file()
    counts = {k: len(suite.TASKS[k].loader(suite.resolve_path(k, None, shared_data))) for k in suite.RETENTION_KINDS}
    assert counts == {"arc-easy": 2376, "arc-challenge": 1172, "piqa": 1838, "winogrande": 1267,
                      "lambada": 5153}
    assert sum(counts.values()) == 11806
