"""lopt.eval: scoring against plain reference computations, parsers, retention and drift."""
from __future__ import annotations

import argparse
import copy
import csv
import importlib.util
import io
import json
import math
import sys
import types
from pathlib import Path

import pytest
import torch

from conftest import ARCHS, make_tiny_model, make_tokenizer
from lopt import eval as ev
from lopt.eval.drift import _CKAStats
from lopt.eval.generation import user_chat_prompt
from lopt.eval.multiple_choice import _spread
from lopt.eval import (EvalError, drift, extract_answer, linear_cka, load_mmlu_redux,
                           mc_loglikelihoods, parse_task, retention_kl)

PROMPTS = ["Tom has 3 apples and buys 4 more.", "the quick brown fox", "How many apples?",
           "0 1 2 3 + 4 = ?", "Write a short answer.", "user query: solve the problem"]


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def llama():
    return make_tiny_model("llama").eval()


# --------------------------------------------------------------------------- plain references


def plain_loglikelihood(model, tok, context: str, continuation: str) -> float:
    """lm-evaluation-harness's recipe written out: trailing context whitespace moves into the
    continuation, continuation tokens = tokens(ctx + cont) after len(tokens(ctx)), one unpadded
    forward over the whole sequence."""
    stripped = context.rstrip()
    continuation = context[len(stripped):] + continuation
    ctx = tok(stripped, add_special_tokens=False)["input_ids"]
    whole = tok(stripped + continuation, add_special_tokens=False)["input_ids"]
    cont = whole[len(ctx):]
    if not ctx:
        ctx = [tok.eos_token_id]
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
    return sum(float(logp[len(ctx) - 1 + k, t]) for k, t in enumerate(cont))


MC_ROWS = [
    {"context": "Question: Tom has 3 apples and buys 4 more. How many apples does he have?\nAnswer:",
     "choices": ["7", "12 apples", "seven", "the quick brown fox"], "answer": 0},
    {"question": "the quick brown fox jumps over the", "choices": ["lazy dog", "café au lait", " dog"],
     "answer": 0},
    {"context": "0 1 2 3 4 5 6 7 8 9 + - * / = ", "choices": ["$", "10", "naïve ünïcödé"], "answer": 1},
    {"context": "user assistant system", "choices": ["instruction", "input output", "response"],
     "answer": 2},
    {"context": "Answer: 3 + 4 = 7 ####", "choices": ["7", "8"], "answer": 0},
]


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# --------------------------------------------------------------------------- multiple choice


def test_mc_acc_and_acc_norm_match_plain_computation(tmp_path, tok):
    model = make_tiny_model("llama", seed=3).eval()
    path = write_jsonl(tmp_path / "mc.jsonl", MC_ROWS)
    res = ev.evaluate(model, tok, [f"mc:{path}"], batch_size=3, progress=False)[f"mc:{path}"]
    acc = acc_norm = 0
    for row in MC_ROWS:
        context = row.get("context", row.get("question"))
        lls = [plain_loglikelihood(model, tok, context, c if c[:1].isspace() else " " + c)
               for c in row["choices"]]
        normed = [ll / len(c.encode("utf-8")) for ll, c in zip(lls, row["choices"])]
        acc += lls.index(max(lls)) == row["answer"]
        acc_norm += normed.index(max(normed)) == row["answer"]
    assert res["n"] == len(MC_ROWS)
    assert abs(res["acc"] - acc / len(MC_ROWS)) < 1e-6
    assert abs(res["acc_norm"] - acc_norm / len(MC_ROWS)) < 1e-6


@pytest.mark.parametrize("arch", ARCHS)
def test_prefix_reuse_equals_full_recomputation(arch, tok):
    model = make_tiny_model(arch).eval()
    shared = "Question: Tom has 3 apples and buys 4 more. "
    requests = [(shared + "How many apples does he have?\nAnswer:", [" 7", " 12 apples", " the lazy dog"]),
                (shared + "Answer:", [" A", " B", " C", " D"]),  # one-token choices
                (shared + "How many?\nAnswer: ", ["3", "4 4 4"]),  # trailing space moves over
                ("the quick brown fox", [" jumps over the lazy dog", " 0 1 2"]),
                ("", ["hello world"])]  # empty context: scored after the EOS token
    reference = [[plain_loglikelihood(model, tok, c, x) for x in conts] for c, conts in requests]
    for batch_size in (1, 2, 8):
        got = mc_loglikelihoods(model, tok, requests, batch_size=batch_size)
        for g, r in zip(got, reference):
            assert g == pytest.approx(r, abs=1e-5)


def test_shared_prefix_is_run_once(tok, llama):
    # The whole batch shares its preamble: the first forward is that prefix alone, batch size 1.
    calls = []
    hook = llama.model.embed_tokens.register_forward_hook(lambda m, a, o: calls.append(tuple(a[0].shape)))
    try:
        pre = "user assistant system instruction input output response query problem solution "
        mc_loglikelihoods(llama, tok, [(pre + "Tom has 3 apples", [" 7", " 8"]),
                                       (pre + "the quick brown fox jumps", [" 7", " 8"])], batch_size=2)
    finally:
        hook.remove()
    # the prefix alone (one row), both context suffixes (two rows), then the choices' second tokens
    # from the cache (four rows) if the tokenizer splits " 7" in two
    assert calls[0][0] == 1 and calls[0][1] >= 20 and calls[1] == (2, max(calls[1][1], 1))
    assert all(shape[1] < 20 for shape in calls[1:])


# --------------------------------------------------------------------------- GSM8K


@pytest.mark.parametrize("text, expected", [
    ("The answer is 1,234.", 1234.0),
    ("She pays $1,234.50 in total", 1234.5),
    ("so the change is -5 dollars", -5.0),
    ("temperature drops to -3.5 degrees", -3.5),
    ("It costs $12.", 12.0),
    ("5 - 3 = 2", 2.0),
    ("so it is 10-3", 3.0),  # a minus right after a number is not a sign
    ("you owe -$7 or $-8", -8.0),
    ("Step 1: 3 + 4 = 7\n#### 7", 7.0),
    ("#### 42 apples, not 43", 42.0),  # the number after '####', trailing text ignored
    ("first 10 then 20 then 30 pears", 30.0),  # no '####': the last number
    ("#### 1,000,000", 1_000_000.0),
    ("#### -12", -12.0),
    ("####\nthe result is 18", 18.0),
    ("#### none here, but 3 before? no: 3 and 5", 3.0),
    ("The value is .5", 0.5),
    ("no number at all", None),
    ("####", None),
    ("", None),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_gsm8k_batched_generation_matches_one_by_one(tmp_path, tok, llama):
    prompts = [user_chat_prompt(tok, p) for p in PROMPTS[:4]]
    batched = ev.generate_greedy(llama, tok, prompts, max_new_tokens=6, batch_size=4)
    single = ev.generate_greedy(llama, tok, prompts, max_new_tokens=6, batch_size=1)
    assert batched == single
    rows = [{"question": "Tom has 3 apples and buys 4 more. How many?", "answer": "3 + 4 = 7\n#### 7"},
            {"question": "What is 1,000 + 234?", "answer": "#### 1,234"}]
    path = write_jsonl(tmp_path / "g.jsonl", rows)
    res = ev.evaluate(llama, tok, [f"gsm8k:{path}"], max_new_tokens=5, progress=False)[f"gsm8k:{path}"]
    assert res["n"] == 2 and 0 <= res["acc"] <= 1 and 0 <= res["unparseable"] <= 2
    assert [e["target"] for e in res["examples"]] == [7.0, 1234.0]


# --------------------------------------------------------------------------- MMLU-Redux


def test_mmlu_redux_real_files_parse(shared_data):
    folder = shared_data / "mmlu-redux"
    rows, counts = load_mmlu_redux(folder)
    files = sorted(folder.glob("*.csv"))
    assert counts["files"] == len(files) == 57
    # Independently: the README's 5,330 ok rows, less any ok row that has no answer.
    ok_without_answer = 0
    for f in files:
        raw = f.read_bytes()
        text = raw.decode("cp1252") if f.name == "mmlu_moral_scenarios.csv" else raw.decode("utf-8")
        delim = ";" if text.splitlines()[0].count(";") > 2 else ","
        for rec in csv.DictReader(io.StringIO(text, newline=""), delimiter=delim):
            if rec["error_type"].strip().lower() == "ok" and not (rec["answer"] or "").strip():
                ok_without_answer += 1
    assert counts["ok"] == 5330
    assert counts["kept"] == len(rows) == 5330 - ok_without_answer
    assert len({r["subject"] for r in rows}) == 57
    assert all(len(r["choices"]) == 4 and 0 <= r["answer"] < 4 for r in rows)
    moral = [r for r in rows if r["subject"] == "moral scenarios"]
    assert moral and not any("\ufffd" in r["question"] for r in moral)
    every, all_counts = load_mmlu_redux(folder, only_ok=False)
    assert len(every) == all_counts["rows"] - all_counts["no_answer"] > len(rows)


def test_mmlu_redux_awkward_csv(tmp_path):
    folder = tmp_path / "redux"
    folder.mkdir()
    # semicolons, reordered columns, cp1252, a row without an answer, an OK in capitals
    (folder / "mmlu_odd_subject.csv").write_bytes(
        "choices;error_type;question;answer\n"
        "\"['caf\u00e9', 'b', 'c', 'd']\";OK;Which one \u2013 first?;0\n"
        "\"['a', 'b', 'c', 'd']\";ok;No answer here;\n"
        "\"['a', 'b', 'c', 'd']\";wrong_groundtruth;Bad one;2\n".encode("cp1252"))
    # commas with extra empty columns
    (folder / "mmlu_plain.csv").write_text(
        "question,choices,answer,error_type,source,,\n"
        "\"What is 2+2?\",\"['3', '4', '5', '6']\",1,ok,,,\n", encoding="utf-8")
    rows, counts = load_mmlu_redux(folder)
    assert counts == {"files": 2, "rows": 4, "ok": 3, "no_answer": 1, "skipped_not_ok": 1, "kept": 2}
    assert rows[0]["subject"] == "odd subject" and rows[0]["choices"][0] == "café"
    assert rows[0]["question"] == "Which one \u2013 first?"
    assert rows[1]["answer"] == 1
    prompt = ev.mmlu_prompt("plain", rows[1]["question"], rows[1]["choices"])
    assert prompt == ("The following are multiple choice questions (with answers) about plain.\n\n"
                      "What is 2+2?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer:")
    (folder / "mmlu_broken.csv").write_text("question,choices,answer,error_type\n"
                                            "Q,\"['a', 'b']\",5,ok\n", encoding="utf-8")
    with pytest.raises(EvalError, match=r"mmlu_broken.csv row 1: answer index 5 out of range"):
        load_mmlu_redux(folder)


def test_mmlu_redux_task_on_tiny_model(tmp_path, tok, llama):
    folder = tmp_path / "redux"
    folder.mkdir()
    for subject in ("alpha", "beta"):
        (folder / f"mmlu_{subject}.csv").write_text(
            "question,choices,answer,error_type\n"
            + "".join(f"\"Q{i} about {subject}?\",\"['w', 'x', 'y', 'z']\",{i % 4},ok\n" for i in range(5)),
            encoding="utf-8")
    res = ev.evaluate(llama, tok, [f"mmlu-redux:{folder}"], limit=6, progress=False)[f"mmlu-redux:{folder}"]
    assert res["n"] == 6 and res["subjects"]["alpha"]["n"] == 3 and res["subjects"]["beta"]["n"] == 3
    # the reported accuracy is the plain argmax over " A".." D"
    rows = _spread(load_mmlu_redux(folder)[0], 6)
    hits = 0
    for r in rows:
        prompt = ev.mmlu_prompt(r["subject"], r["question"], r["choices"])
        lls = [plain_loglikelihood(llama, tok, prompt, " " + c) for c in "ABCD"]
        hits += lls.index(max(lls)) == r["answer"]
    assert res["acc"] == pytest.approx(hits / 6, abs=1e-6)


# --------------------------------------------------------------------------- ppl and task-loss


def test_perplexity_matches_plain_computation(tok, llama):
    text = "the quick brown fox jumps over the lazy dog 0 1 2 3 4 5 6 7 8 9 " * 3
    ids = [tok.eos_token_id] + tok(text, add_special_tokens=False)["input_ids"]
    total, n = 0.0, 0
    for s in range(0, len(ids) - 1, 16):  # non-overlapping windows of 16
        window = ids[s: s + 17]
        with torch.no_grad():
            logits = llama(torch.tensor([window[:-1]])).logits[0]
        total += float(torch.nn.functional.cross_entropy(logits, torch.tensor(window[1:]), reduction="sum"))
        n += len(window) - 1
    res = ev.perplexity(llama, tok, text, window=16, batch_size=3)
    assert res["tokens"] == n == len(ids) - 1
    assert res["windows"] == math.ceil(n / 16)
    assert res["ppl"] == pytest.approx(math.exp(total / n), rel=1e-5)


def test_task_loss_on_arithmetic(tok, llama):
    pytest.importorskip("lopt.data")
    from lopt.data import build_sft_dataset, collate

    res = ev.task_loss(llama, tok, "arithmetic", limit=5, batch_size=2)
    examples, _ = build_sft_dataset("arithmetic", tok, max_length=512, split="test", limit=5)
    b = collate(examples, tok.pad_token_id)
    with torch.no_grad():  # transformers' own loss is the token-weighted mean over labels
        ref = llama(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss
    assert res["n"] == 5 and res["loss"] == pytest.approx(float(ref), rel=1e-5)


# --------------------------------------------------------------------------- retention and drift


def test_retention_kl_of_a_model_against_itself_is_zero(tok, llama):
    twin = copy.deepcopy(llama)
    res = ev.evaluate(llama, tok, ["retention-kl"], base=twin, limit=6, batch_size=4,
                      kl_new_tokens=8, progress=False)["retention-kl"]
    assert abs(res["kl"]) < 1e-6
    assert res["nll"] == pytest.approx(res["base_nll"], abs=1e-6)
    assert res["prompts"] == 6 and res["tokens"] > 0
    other = make_tiny_model("llama", seed=1).eval()
    moved = retention_kl(other, llama, tok, prompts=PROMPTS, max_new_tokens=8, batch_size=4)
    assert moved["kl"] > 1e-3


def test_drift_cka_is_one_against_itself_and_drops_when_perturbed(tmp_path, tok, llama):
    seqs = ev.base_continuations(llama, tok, PROMPTS, max_new_tokens=8, batch_size=3)
    same = drift(copy.deepcopy(llama), llama, tok, sequences=seqs, boundaries=[2], batch_size=4)
    assert len(same["layers"]) == llama.config.num_hidden_layers + 1
    for layer in same["layers"]:
        assert layer["cka"] == pytest.approx(1.0, abs=1e-6)
        assert layer["cos"] == pytest.approx(1.0, abs=1e-5)
    assert [entry["index"] for entry in same["layers"] if entry["boundary"]] == [2]
    perturbed = copy.deepcopy(llama)
    with torch.no_grad():
        for p in perturbed.model.layers[1].parameters():
            p.add_(torch.randn_like(p) * 0.5)
    moved = drift(perturbed, llama, tok, sequences=seqs, batch_size=4)
    ckas = [entry["cka"] for entry in moved["layers"]]
    assert ckas[0] == pytest.approx(1.0, abs=1e-6) and ckas[1] == pytest.approx(1.0, abs=1e-6)
    assert min(ckas[2:]) < 0.99 and moved["mean_cka"] < same["mean_cka"]


def test_linear_cka_properties_and_streaming():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 16, generator=g)
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=g))
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(x, 3.0 * x @ q + 5.0) == pytest.approx(1.0, abs=1e-9)  # rotation, scale, shift
    y = torch.randn(200, 8, generator=g)
    value = linear_cka(x, y)
    assert 0.0 < value < 0.3
    stats = _CKAStats()
    for part in range(4):
        stats.update(x[part * 50:(part + 1) * 50], y[part * 50:(part + 1) * 50])
    assert stats.value() == pytest.approx(value, abs=1e-10)


def test_boundaries_from_lopt_run_json(tmp_path, tok, llama):
    (tmp_path / "lopt_run.json").write_text(json.dumps({"block_ranges": [[0, 1], [1, 3], [3, 4]]}))
    assert ev.read_boundaries(tmp_path) == [1, 3]
    assert ev.read_boundaries(tmp_path / "nothing") is None
    model = copy.deepcopy(llama)
    model.config._name_or_path = str(tmp_path)  # as from_pretrained(dir) leaves it
    res = ev.evaluate(model, tok, ["drift"], base=llama, limit=2, kl_new_tokens=4, progress=False)["drift"]
    assert res["boundaries"] == [1, 3]
    assert [e["index"] for e in res["layers"] if e["boundary"]] == [1, 3]


# --------------------------------------------------------------------------- bad input


def test_parse_task():
    assert parse_task("gsm8k:data/test.jsonl") == ("gsm8k", "data/test.jsonl")
    assert parse_task("gsm8k") == ("gsm8k", None)
    assert parse_task("mmlu-redux") == ("mmlu-redux", None)
    assert parse_task("lm-eval:hellaswag,arc_easy") == ("lm-eval", "hellaswag,arc_easy")
    assert parse_task("Retention-KL") == ("retention-kl", None)
    assert parse_task("ppl:C:/x.txt") == ("ppl", "C:/x.txt")
    with pytest.raises(EvalError, match=r"unknown task kind 'bleu'.*gsm8k, mc, mmlu-redux, ppl"):
        parse_task("bleu:x")
    with pytest.raises(EvalError, match="needs an argument"):
        parse_task("mc")
    with pytest.raises(EvalError, match="takes no argument"):
        parse_task("drift:x")


def test_bad_inputs(tmp_path, tok, llama):
    with pytest.raises(EvalError, match="unknown task kind"):
        ev.evaluate(llama, tok, ["squad:x"], progress=False)
    with pytest.raises(EvalError, match="file not found: .*missing.jsonl"):
        ev.evaluate(llama, tok, [f"mc:{tmp_path / 'missing.jsonl'}"], progress=False)
    with pytest.raises(EvalError, match="file not found"):
        ev.evaluate(llama, tok, [f"gsm8k:{tmp_path / 'nope.jsonl'}"], progress=False)
    bad = write_jsonl(tmp_path / "bad.jsonl",
                      [MC_ROWS[0], {"context": "x", "choices": ["a", "b"], "answer": 2}])
    with pytest.raises(EvalError, match=r"bad.jsonl line 2: answer index 2 out of range for 2 choices"):
        ev.evaluate(llama, tok, [f"mc:{bad}"], progress=False)
    for kind in ("retention-kl", "drift"):
        with pytest.raises(EvalError, match="give --base"):
            ev.evaluate(llama, tok, [kind], progress=False)
    # everything is checked before any scoring starts
    with pytest.raises(EvalError, match="give --base"):
        ev.check_tasks([f"mc:{bad}", "drift"], has_base=False)


def test_lm_eval_missing_gives_one_clear_line(monkeypatch, tok, llama):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # makes `import lm_eval` fail
    with pytest.raises(EvalError) as err:
        ev.evaluate(llama, tok, ["lm-eval:hellaswag"], progress=False)
    message = str(err.value)
    assert "\n" not in message and "not installed" in message and "lopt[eval]" in message


# --------------------------------------------------------------------------- CLI


def _fake_models(monkeypatch, tok):
    """Stand-in for lopt.models: tiny models, a different one for the base."""
    def load_model(name=None, gguf_file=None, dtype=None, device=None):
        return make_tiny_model("llama", seed=0 if name == "tuned" else 1).eval(), tok

    monkeypatch.setattr("lopt.eval.runner.load_model", load_model)


def test_eval_cli_writes_json_and_compare_reads_it(tmp_path, monkeypatch, capsys, tok):
    _fake_models(monkeypatch, tok)
    mc = write_jsonl(tmp_path / "mc.jsonl", MC_ROWS)
    parser = argparse.ArgumentParser()
    ev.add_eval_arguments(parser)
    out_tuned, out_base = tmp_path / "tuned.json", tmp_path / "base.json"
    args = parser.parse_args(["--model", "tuned", "--base", "basemodel", "--task", f"mc:{mc}",
                              "--task", "retention-kl", "--limit", "3", "--json", str(out_tuned),
                              "--no-progress"])
    assert ev.run_eval_cli(args) == 0
    record = json.loads(out_tuned.read_text())
    assert record["model"] == "tuned" and set(record["results"]) == {f"mc:{mc}", "retention-kl"}
    assert record["units"] == {"time": "seconds"}
    args = parser.parse_args(["--model", "basemodel", "--task", f"mc:{mc}", "--json", str(out_base),
                              "--no-progress"])
    assert ev.run_eval_cli(args) == 0
    capsys.readouterr()

    cparser = argparse.ArgumentParser()
    ev.add_compare_arguments(cparser)
    png = tmp_path / "chart.png"
    assert ev.run_compare_cli(cparser.parse_args([str(out_base), str(out_tuned), "--png", str(png)])) == 0
    text = capsys.readouterr().out
    assert "| task | metric | base (base) | tuned |" in text
    base_acc = json.loads(out_base.read_text())["results"][f"mc:{mc}"]["acc"]
    tuned_acc = record["results"][f"mc:{mc}"]["acc"]
    assert f"({tuned_acc - base_acc:+.4f})" in text
    assert "retention-kl | kl" in text
    if importlib.util.find_spec("matplotlib") is not None:
        assert png.is_file() and png.stat().st_size > 0
    else:
        assert "matplotlib is not installed" in text
    # --json PATH: the table as JSON; '-': on standard output, the table then goes to stderr
    table = tmp_path / "cmp" / "table.json"
    assert ev.run_compare_cli(cparser.parse_args([str(out_base), str(out_tuned), "--png", "", "--json",
                                                  str(table)])) == 0
    data = json.loads(table.read_text())
    assert data["runs"] == ["base", "tuned"] and data["baseline"] == "base"
    row = next(r for r in data["rows"] if r["task"] == f"mc:{mc}" and r["metric"] == "acc")
    assert row["values"] == {"base": base_acc, "tuned": tuned_acc}
    capsys.readouterr()
    assert ev.run_compare_cli(cparser.parse_args([str(out_base), str(out_tuned), "--png", "", "--json", "-"])) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out) == data and "| task | metric |" in captured.err
    args = parser.parse_args(["--model", "basemodel", "--task", f"mc:{mc}", "--json", "-", "--no-progress"])
    assert ev.run_eval_cli(args) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["results"][f"mc:{mc}"]["acc"] == base_acc and "| task |" in captured.err


def test_eval_default_files_come_from_data_dir(tmp_path, monkeypatch, capsys, tok):
    _fake_models(monkeypatch, tok)
    monkeypatch.delenv("LOPT_DATA_DIR", raising=False)
    parser = argparse.ArgumentParser()
    ev.add_eval_arguments(parser)
    with pytest.raises(EvalError, match="give --data-dir DIR or set LOPT_DATA_DIR; or give the path as gsm8k:PATH"):
        ev.run_eval_cli(parser.parse_args(["--model", "tuned", "--task", "gsm8k", "--no-progress"]))
    folder = tmp_path / "data"
    (folder / "gsm8k").mkdir(parents=True)
    write_jsonl(folder / "gsm8k" / "test.jsonl", [{"question": "What is 2 + 2?", "answer": "2 + 2 = 4\n#### 4"}])
    args = parser.parse_args(["--model", "tuned", "--task", "gsm8k", "--data-dir", str(folder), "--limit", "1",
                              "--max-new-tokens", "2", "--json", str(tmp_path / "e.json"), "--no-progress"])
    assert ev.run_eval_cli(args) == 0
    assert json.loads((tmp_path / "e.json").read_text())["results"]["gsm8k"]["n"] == 1


def test_eval_cli_base_missing_fails_before_loading(monkeypatch, tok):
    def boom(*a, **k):
        raise AssertionError("no model should be loaded")

    monkeypatch.setattr("lopt.eval.runner.load_model", boom)
    parser = argparse.ArgumentParser()
    ev.add_eval_arguments(parser)
    with pytest.raises(EvalError, match="give --base"):
        ev.run_eval_cli(parser.parse_args(["--task", "drift"]))


# --------------------------------------------------------------------------- the embedded model


@pytest.mark.slow
def test_embedded_model_smoke(shared_data):
    models = pytest.importorskip("lopt.models")
    model, tokenizer = models.load_model(None)
    res = ev.evaluate(model, tokenizer, [f"mmlu-redux:{shared_data / 'mmlu-redux'}", "retention-kl"],
                      base=model, limit=12, kl_new_tokens=8, progress=False)
    mmlu = res[f"mmlu-redux:{shared_data / 'mmlu-redux'}"]
    assert mmlu["n"] == 12 and len(mmlu["subjects"]) == 12 and 0.0 <= mmlu["acc"] <= 1.0
    assert abs(res["retention-kl"]["kl"]) < 1e-6
