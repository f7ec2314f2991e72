"""lopt.data: loading, format detection, assistant-only labels, batching, the embedded dataset."""
from __future__ import annotations

import copy
import csv
import json
import re
import sys

import pytest
import torch

from conftest import make_tokenizer
from lopt.data import (EMBEDDED, IGNORE_INDEX, PRESETS, Batches, DataError, build_sft_dataset,
                       chat_prompt, collate, detect_format, load_records, make_arithmetic_dataset,
                       to_messages, tokenize_messages)

EOT = "<|im_end|>"


@pytest.fixture(scope="module")
def plain_tokenizer():
    """The test tokenizer without a chat template: lopt falls back to '### User:' format."""
    tok = copy.deepcopy(make_tokenizer())
    tok.chat_template = None
    return tok


def trained_text(tok, ex) -> str:
    return tok.decode([i for i, l in zip(ex["input_ids"], ex["labels"]) if l != IGNORE_INDEX])


def trained_segments(labels) -> int:
    """Number of contiguous runs of trained labels."""
    runs, prev = 0, False
    for l in labels:
        cur = l != IGNORE_INDEX
        runs += cur and not prev
        prev = cur
    return runs


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# --------------------------------------------------------------------------- formats

RECORDS = {
    "messages": {"messages": [{"role": "user", "content": "Hi there"},
                              {"role": "assistant", "content": "Hello! 3 + 4 = 7"}]},
    "alpaca": {"instruction": "Add the numbers.", "input": "3 and 4", "output": "3 + 4 = 7"},
    "query_response": {"query": "What is 3 + 4?", "response": "3 + 4 = 7", "type": "x"},
    "question_answer": {"question": "Tom has 3 apples and buys 4 more.", "answer": "3 + 4 = 7\n#### 7"},
    "problem_solution": {"problem": "Compute 3 + 4.", "solution": "The answer is 7."},
    "prompt_completion": {"prompt": "3 + 4 =", "completion": " 7"},
}
RESPONSES = {"messages": "Hello! 3 + 4 = 7", "alpaca": "3 + 4 = 7", "query_response": "3 + 4 = 7",
             "question_answer": "3 + 4 = 7\n#### 7", "problem_solution": "The answer is 7.",
             "prompt_completion": " 7"}


@pytest.mark.parametrize("fmt", list(RECORDS))
def test_detect_format(fmt):
    assert detect_format(RECORDS[fmt].keys()) == fmt


def test_detect_format_alpaca_without_input_and_sharegpt():
    assert detect_format(["instruction", "output"]) == "alpaca"
    assert detect_format(["conversations", "id"]) == "messages"
    # alpaca's extra 'text' column and a question/answer pair: the more specific format wins
    assert detect_format(["instruction", "input", "output", "text"]) == "alpaca"


def test_detect_format_unknown_lists_columns_and_accepted_sets():
    with pytest.raises(DataError) as e:
        detect_format(["foo", "bar"])
    msg = str(e.value)
    assert "['bar', 'foo']" in msg
    for cols in ("messages", "instruction/output", "query/response", "question/answer",
                 "problem/solution", "prompt/completion"):
        assert cols in msg
    assert "\n" not in msg


def test_to_messages_each_format():
    assert to_messages(RECORDS["alpaca"], "alpaca") == [
        {"role": "user", "content": "Add the numbers.\n\n3 and 4"},
        {"role": "assistant", "content": "3 + 4 = 7"}]
    assert to_messages({"instruction": "Say hi.", "input": "", "output": "hi"}, "alpaca")[0] == \
        {"role": "user", "content": "Say hi."}
    assert to_messages(RECORDS["question_answer"], "question_answer") == [
        {"role": "user", "content": "Tom has 3 apples and buys 4 more."},
        {"role": "assistant", "content": "3 + 4 = 7\n#### 7"}]
    assert to_messages({**RECORDS["query_response"], "system": "Be brief."}, "query_response")[0] == \
        {"role": "system", "content": "Be brief."}
    sharegpt = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}
    assert to_messages(sharegpt, "messages") == [{"role": "user", "content": "hi"},
                                                 {"role": "assistant", "content": "yo"}]
    # trailing user turn can't be trained: dropped
    msgs = RECORDS["messages"]["messages"] + [{"role": "user", "content": "thanks"}]
    assert to_messages({"messages": msgs}, "messages")[-1]["role"] == "assistant"


@pytest.mark.parametrize("record,fmt", [
    ({"question": "q", "answer": ""}, "question_answer"),
    ({"question": "q"}, "question_answer"),
    ({"instruction": "i", "input": "x", "output": "  "}, "alpaca"),
    ({"prompt": "p", "completion": None}, "prompt_completion"),
    ({"messages": [{"role": "user", "content": "only a question"}]}, "messages"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]}, "messages"),
])
def test_to_messages_no_response(record, fmt):
    with pytest.raises(DataError, match="no response"):
        to_messages(record, fmt)


# --------------------------------------------------------------------------- labels


@pytest.mark.parametrize("fmt", list(RECORDS))
def test_labels_exactly_response_plus_end_of_turn(tokenizer, fmt):
    msgs = to_messages(RECORDS[fmt], fmt)
    ex = tokenize_messages(msgs, tokenizer, max_length=512)
    assert not ex["truncated"] and len(ex["input_ids"]) == len(ex["labels"])
    assert trained_text(tokenizer, ex) == RESPONSES[fmt] + EOT
    # everything before the response is exactly the prompt the model sees at inference, all masked
    first = next(i for i, l in enumerate(ex["labels"]) if l != IGNORE_INDEX)
    prompt = tokenizer.apply_chat_template(msgs[:-1], tokenize=False, add_generation_prompt=True)
    assert tokenizer.decode(ex["input_ids"][:first]) == prompt
    assert all(l == IGNORE_INDEX for l in ex["labels"][:first])
    # trained labels are the input ids themselves (the model shifts them), in one contiguous run
    assert all(l in (IGNORE_INDEX, i) for i, l in zip(ex["input_ids"], ex["labels"]))
    assert trained_segments(ex["labels"]) == 1
    # the template's newline after <|im_end|> is not trained
    assert tokenizer.decode(ex["input_ids"][-1:]) == "\n" and ex["labels"][-1] == IGNORE_INDEX


MULTI_TURN = [{"role": "system", "content": "You add numbers."},
              {"role": "user", "content": "3 + 4?"},
              {"role": "assistant", "content": "7"},
              {"role": "user", "content": "and 5 + 6?"},
              {"role": "assistant", "content": "5 + 6 = 11"}]


def test_multi_turn_trains_every_assistant_turn(tokenizer):
    ex = tokenize_messages(MULTI_TURN, tokenizer, max_length=512)
    assert trained_text(tokenizer, ex) == "7" + EOT + "5 + 6 = 11" + EOT
    assert trained_segments(ex["labels"]) == 2
    masked = tokenizer.decode([i for i, l in zip(ex["input_ids"], ex["labels"]) if l == IGNORE_INDEX])
    for m in MULTI_TURN:
        if m["role"] != "assistant":
            assert m["content"] in masked
    assert tokenizer.decode(ex["input_ids"]) == tokenizer.apply_chat_template(MULTI_TURN, tokenize=False)


def test_template_that_rewrites_earlier_turns(tokenizer):
    # Like Qwen3 dropping earlier reasoning: the last assistant turn renders differently from the
    # same turn followed by more messages, so incremental prefixes don't line up.
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{% if m['role'] == 'assistant' and loop.last %}[final] {% endif %}{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    ex = tokenize_messages(MULTI_TURN, tok, max_length=512)
    assert trained_text(tok, ex) == "7" + EOT + "[final] 5 + 6 = 11" + EOT


def test_token_straddling_prompt_and_response_is_trained(tokenizer):
    # The generation prompt ends with a space that merges with the answer's first token (' 7'):
    # that token is the first thing the model must write, so it is trained.
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}: {{ m['content'] }}<|im_end|>\n"
                         "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant: {% endif %}")
    msgs = [{"role": "user", "content": "3 + 4?"}, {"role": "assistant", "content": "7 apples"}]
    ex = tokenize_messages(msgs, tok, max_length=512)
    assert "\u0120" + "7" in tok.convert_ids_to_tokens(ex["input_ids"])  # the straddling token exists
    assert trained_text(tok, ex) == " 7 apples" + EOT


def test_no_chat_template_uses_plain_fallback(plain_tokenizer):
    msgs = to_messages(RECORDS["question_answer"], "question_answer")
    ex = tokenize_messages(msgs, plain_tokenizer, max_length=512)
    assert plain_tokenizer.decode(ex["input_ids"]) == (
        "### User:\nTom has 3 apples and buys 4 more.\n\n### Assistant:\n3 + 4 = 7\n#### 7" + EOT)
    assert trained_text(plain_tokenizer, ex) == "3 + 4 = 7\n#### 7" + EOT
    multi = tokenize_messages(MULTI_TURN, plain_tokenizer, max_length=512)
    assert trained_text(plain_tokenizer, multi) == "7" + EOT + "5 + 6 = 11" + EOT
    assert "<|im_start|>" not in plain_tokenizer.decode(multi["input_ids"])
    assert "### System:\nYou add numbers." in plain_tokenizer.decode(multi["input_ids"])
    # generation prompts match training prompts, with and without a template
    assert chat_prompt(plain_tokenizer, "hi") == "### User:\nhi\n\n### Assistant:\n"
    first = next(i for i, l in enumerate(ex["labels"]) if l != IGNORE_INDEX)
    assert plain_tokenizer.decode(ex["input_ids"][:first]) == chat_prompt(plain_tokenizer, msgs[0]["content"])


def test_chat_template_is_used_when_present(tokenizer):
    ex = tokenize_messages(to_messages(RECORDS["alpaca"], "alpaca"), tokenizer, max_length=512)
    text = tokenizer.decode(ex["input_ids"])
    assert text.startswith("<|im_start|>user\nAdd the numbers.\n\n3 and 4<|im_end|>") and "###" not in text


def test_no_second_bos(tokenizer):
    # A tokenizer whose post-processor adds BOS and whose template also writes it: BOS once.
    from tokenizers.processors import TemplateProcessing

    tok = copy.deepcopy(tokenizer)
    bos_id = tok.convert_tokens_to_ids("<pad>")
    tok.backend_tokenizer.post_processor = TemplateProcessing(single="<pad> $A", special_tokens=[("<pad>", bos_id)])
    tok.chat_template = "<pad>" + tok.chat_template
    ex = tokenize_messages(to_messages(RECORDS["problem_solution"], "problem_solution"), tok, 512)
    assert ex["input_ids"][0] == bos_id and ex["input_ids"][1] != bos_id
    assert ex["input_ids"].count(bos_id) == 1


def test_truncation(tokenizer):
    msgs = to_messages(RECORDS["question_answer"], "question_answer")
    full = tokenize_messages(msgs, tokenizer, max_length=512)
    n = len(full["input_ids"])
    cut = tokenize_messages(msgs, tokenizer, max_length=n - 3)
    assert cut["truncated"] and len(cut["input_ids"]) == len(cut["labels"]) == n - 3
    assert cut["input_ids"] == full["input_ids"][: n - 3] and cut["labels"] == full["labels"][: n - 3]
    assert not tokenize_messages(msgs, tokenizer, max_length=n)["truncated"]


# --------------------------------------------------------------------------- build_sft_dataset


def test_build_counts_truncated_and_dropped(tokenizer, tmp_path):
    short = {"question": "1 + 1?", "answer": "2"}
    long_answer = {"question": "1 + 1?", "answer": "one plus one " * 40}
    long_prompt = {"question": "count " * 200, "answer": "2"}
    path = write_jsonl(tmp_path / "d.jsonl", [short, long_answer, long_prompt, short])
    prompt_len = len(tokenize_messages(to_messages(short, "question_answer"), tokenizer, 10_000)["labels"]) \
        - len(tokenizer("2" + EOT + "\n", add_special_tokens=False)["input_ids"])
    max_length = prompt_len + 10
    examples, stats = build_sft_dataset(str(path), tokenizer, max_length=max_length)
    assert stats["format"] == "question_answer" and stats["rows"] == len(examples) == 3
    assert stats["truncated"] == 1 and stats["dropped_no_response_tokens"] == 1
    assert stats["tokens"] == sum(len(e["input_ids"]) for e in examples)
    assert max(len(e["input_ids"]) for e in examples) == max_length
    assert all(any(l != IGNORE_INDEX for l in e["labels"]) for e in examples)


def test_build_max_length_shorter_than_every_prompt(tokenizer, tmp_path):
    rows = [{"question": "what is one plus one plus one?", "answer": "3"},
            {"question": "1 + 1?", "answer": "2"}]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    ex = tokenize_messages(to_messages(rows[1], "question_answer"), tokenizer, 512)
    shortest = next(i for i, l in enumerate(ex["labels"]) if l != IGNORE_INDEX)
    with pytest.raises(DataError) as e:
        build_sft_dataset(str(path), tokenizer, max_length=shortest)
    assert str(e.value) == (f"max_length {shortest} is shorter than the prompts of {path} "
                            f"(shortest prompt: {shortest} tokens); raise --max-length")
    # one more token and the shortest row keeps its first response token
    examples, stats = build_sft_dataset(str(path), tokenizer, max_length=shortest + 1)
    assert stats["rows"] == 1 and stats["dropped_no_response_tokens"] == 1


def test_build_row_without_response_is_skipped_and_counted_with_its_line(tokenizer, tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps({"question": "a", "answer": "b"}) + "\n\n"
                    + json.dumps({"question": "c", "answer": ""}) + "\n")
    examples, stats = build_sft_dataset(str(path), tokenizer)
    assert len(examples) == stats["rows"] == 1
    assert stats["skipped"] == {"empty_response": 1} and stats["skipped_first"] == {"empty_response": "line 3"}
    # only that row: with nothing left it is an error naming the file and the reason
    path.write_text(json.dumps({"question": "c", "answer": ""}) + "\n")
    with pytest.raises(DataError) as e:
        build_sft_dataset(str(path), tokenizer)
    assert str(e.value).startswith(f"{path}: no usable row") and "empty response, first at line 1" in str(e.value)


def test_build_arithmetic_all_rows_trained(tokenizer):
    examples, stats = build_sft_dataset(EMBEDDED, tokenizer, max_length=512, limit=50)
    rows = load_records(EMBEDDED, limit=50)
    assert stats["rows"] == 50 and stats["truncated"] == 0 and stats["dropped_no_response_tokens"] == 0
    for ex, row in zip(examples, rows):
        assert trained_text(tokenizer, ex) == row["answer"] + EOT


# --------------------------------------------------------------------------- loading


ROWS = [{"question": "What is 2 + 2?", "answer": "2 + 2 = 4\n#### 4"},
        {"question": "Is 'a, b' a list?", "answer": "yes"}]


def test_load_each_file_type(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    write_jsonl(tmp_path / "d.jsonl", ROWS)
    (tmp_path / "d.json").write_text(json.dumps(ROWS))
    (tmp_path / "w.json").write_text(json.dumps({"data": ROWS}))
    with (tmp_path / "d.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, ["question", "answer"])
        w.writeheader()
        w.writerows(ROWS)
    with (tmp_path / "s.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, ["question", "answer"], delimiter=";")
        w.writeheader()
        w.writerows(ROWS)
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "d.parquet")
    for name in ("d.jsonl", "d.json", "w.json", "d.csv", "s.csv", "d.parquet"):
        assert load_records(str(tmp_path / name)) == ROWS, name
    assert load_records(str(tmp_path / "d.jsonl"), limit=1) == ROWS[:1]


def test_load_gsm8k_file_with_limit(shared_data, tokenizer):
    path = shared_data / "gsm8k" / "train.jsonl"
    rows = load_records(str(path), limit=5)
    with path.open() as f:
        expected = [json.loads(next(f)) for _ in range(5)]
    assert rows == expected
    assert detect_format(rows[0].keys()) == "question_answer"
    assert all(re.search(r"\n#### -?[\d,.]+$", r["answer"]) for r in rows)
    examples, stats = build_sft_dataset(str(path), tokenizer, max_length=2048, limit=5)
    assert stats["rows"] == 5 and stats["truncated"] == 0
    assert trained_text(tokenizer, examples[0]) == expected[0]["answer"] + EOT


def test_presets_read_the_data_folder_given_and_never_guess(tmp_path, monkeypatch, tokenizer):
    from lopt.data import data_dir, local_preset, validate_dataset

    folder = tmp_path / "data"
    (folder / "gsm8k").mkdir(parents=True)
    (folder / "gsm8k" / "train.jsonl").write_text("\n".join(json.dumps(r) for r in ROWS) + "\n")
    monkeypatch.delenv("LOPT_DATA_DIR", raising=False)
    monkeypatch.chdir(tmp_path)  # no folder is guessed from the working directory either
    assert data_dir() is None and local_preset("gsm8k", "train") is None  # the hub, then
    assert data_dir(str(folder)) == folder
    with pytest.raises(DataError, match="--data-dir .*nowhere: no such folder"):
        data_dir(str(tmp_path / "nowhere"))
    # --data-dir, else LOPT_DATA_DIR: the preset's local file
    assert load_records("gsm8k", data_dir=folder) == ROWS
    monkeypatch.setenv("LOPT_DATA_DIR", str(folder))
    assert data_dir() == folder and load_records("gsm8k", limit=1) == ROWS[:1]
    examples, stats = build_sft_dataset("gsm8k", tokenizer, max_length=256)
    assert stats["rows"] == len(ROWS)
    assert validate_dataset("gsm8k")["checked"]
    # the folder lacks the split: a one-line error naming both ways to give a folder, no hub fall-back
    with pytest.raises(DataError, match=r"gsm8k/test\.jsonl not found .*give --data-dir DIR or set LOPT_DATA_DIR"):
        validate_dataset("gsm8k", split="test")
    # presets without a local layout stay on the hub, whatever the folder
    assert local_preset("alpaca", "train") is None


def test_error_missing_file(tmp_path):
    path = tmp_path / "nope.jsonl"
    with pytest.raises(DataError, match=re.escape(f"{path}: file not found")):
        load_records(str(path))
    with pytest.raises(DataError, match="file not found"):
        load_records("./nope/data")


def test_error_unknown_extension(tmp_path):
    path = tmp_path / "data.txt"
    path.write_text("question,answer\n")
    with pytest.raises(DataError) as e:
        load_records(str(path))
    assert str(path) in str(e.value) and "'.txt'" in str(e.value) and ".jsonl" in str(e.value)


def test_error_bad_json_line_has_line_number(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n\n" + '{"question": "x", "answer": \n' + json.dumps(ROWS[1]) + "\n")
    with pytest.raises(DataError) as e:
        load_records(str(path))
    assert str(e.value).startswith(f"{path} line 3: not valid JSON") and "\n" not in str(e.value)
    path.write_text(json.dumps(ROWS[0]) + "\n[1, 2]\n")
    with pytest.raises(DataError, match="line 2: expected a JSON object"):
        load_records(str(path))


@pytest.mark.parametrize("name,content", [("e.jsonl", ""), ("b.jsonl", "\n  \n"), ("e.json", "[]"),
                                          ("e.csv", "question,answer\n")])
def test_error_empty_dataset(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError, match=re.escape(f"{path}: no records found")):
        load_records(str(path))


def test_embedded_dataset_sizes_and_splits():
    assert len(load_records(EMBEDDED)) == 2000
    assert len(load_records(EMBEDDED, split="test")) == 200
    assert load_records(EMBEDDED, limit=7) == load_records(EMBEDDED)[:7]
    with pytest.raises(DataError, match="splits"):
        load_records(EMBEDDED, split="validation")
    with pytest.raises(DataError, match="limit"):
        load_records(EMBEDDED, limit=0)


def test_hub_path_with_fake_datasets(monkeypatch):
    import types

    calls = []

    def load_dataset(name, config=None, split=None, streaming=False):
        calls.append((name, config, split, streaming))
        if name == "offline/ds":
            raise ConnectionError("Couldn't reach 'offline/ds' on the Hub\n(more detail)")
        return iter(ROWS * 3)

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    monkeypatch.delenv("LOPT_DATA_DIR", raising=False)  # no data folder: the presets come from the hub
    assert load_records("gsm8k", limit=2) == ROWS
    assert calls[-1] == ("openai/gsm8k", "main", "train", True)
    assert load_records("someone/dataset", split="test") == ROWS * 3
    assert calls[-1] == ("someone/dataset", None, "test", False)
    assert PRESETS["tulu3"] == ("allenai/tulu-3-sft-mixture", None, "train")
    with pytest.raises(DataError) as e:
        load_records("offline/ds")
    assert "could not load dataset 'offline/ds'" in str(e.value) and "network" in str(e.value)
    assert "\n" not in str(e.value)
    monkeypatch.setitem(sys.modules, "datasets", None)  # not installed
    with pytest.raises(DataError, match="needs the 'datasets' package"):
        load_records("alpaca")


def test_local_folder_through_datasets(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")  # keep ~/.cache clean
    write_jsonl(tmp_path / "train.jsonl", ROWS)
    write_jsonl(tmp_path / "test.jsonl", ROWS[::-1])
    assert load_records(str(tmp_path), split="test", limit=2) == ROWS[::-1]


# --------------------------------------------------------------------------- batching


def test_collate_dynamic_padding():
    exs = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
           {"input_ids": [8, 9, 10, 11, 12], "labels": [-100, -100, 10, 11, 12]},
           {"input_ids": [13, 14], "labels": [-100, 14]}]
    b = collate(exs, pad_token_id=1)
    assert b["input_ids"].shape == (3, 5) and all(v.dtype == torch.long for v in b.values())
    assert b["input_ids"].tolist() == [[5, 6, 7, 1, 1], [8, 9, 10, 11, 12], [13, 14, 1, 1, 1]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert b["labels"].tolist() == [[-100, 6, 7, -100, -100], [-100, -100, 10, 11, 12], [-100, 14, -100, -100, -100]]
    assert collate(exs[:1], pad_token_id=None)["input_ids"].shape == (1, 3)  # no padding needed
    assert collate([exs[0], exs[2]], pad_token_id=None)["input_ids"][1].tolist() == [13, 14, 0]


def make_examples(n):
    # example i has length 1 + i % 4 and carries its own index as first id, so batches identify rows
    return [{"input_ids": [i] + [0] * (i % 4), "labels": [i] + [0] * (i % 4)} for i in range(n)]


def ids_of(batch):
    return batch["input_ids"][:, 0].tolist()


def test_batches_cover_each_epoch_and_are_deterministic():
    exs = make_examples(10)
    a, b = Batches(exs, 4, 0, seed=3), Batches(exs, 4, 0, seed=3)
    assert a.batches_per_epoch == len(a) == 3
    epochs = []
    for _ in range(3):
        batches = [next(a) for _ in range(3)]
        assert [len(ids_of(x)) for x in batches] == [4, 4, 2]  # partial last batch kept
        epochs.append(sum((ids_of(x) for x in batches), []))
        assert sorted(epochs[-1]) == list(range(10))
        for x in batches:  # padded to the longest in the batch, never more
            assert x["input_ids"].shape[1] == max(1 + i % 4 for i in ids_of(x))
    assert epochs[0] != epochs[1]  # reshuffled each epoch
    assert sum((ids_of(next(b)) for _ in range(9)), []) == sum(epochs, [])
    other = Batches(exs, 4, 0, seed=4)
    assert sum((ids_of(next(other)) for _ in range(3)), []) != epochs[0]
    ordered = Batches(exs, 4, 0, shuffle=False)
    assert [ids_of(next(ordered)) for _ in range(4)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9], [0, 1, 2, 3]]


@pytest.mark.parametrize("taken", [0, 2, 3, 7])
def test_batches_resume(taken):
    exs = make_examples(11)
    a = Batches(exs, 3, 0, seed=1)
    for _ in range(taken):
        next(a)
    state = json.loads(json.dumps(a.state_dict()))  # survives a checkpoint round trip
    assert set(state) == {"epoch", "index"}
    expected = [ids_of(next(a)) for _ in range(6)]
    b = Batches(exs, 3, 0, seed=1)
    b.load_state_dict(state)
    assert [ids_of(next(b)) for _ in range(6)] == expected


def test_batches_bad_state_and_inputs():
    b = Batches(make_examples(5), 2, 0)
    with pytest.raises(DataError, match="batch size"):
        b.load_state_dict({"epoch": 0, "index": 9})
    with pytest.raises(DataError):
        Batches([], 2, 0)


# --------------------------------------------------------------------------- embedded arithmetic

EQUATION = re.compile(r"(\d+) ([-+*/]) (\d+) = (\d+)")


def test_arithmetic_deterministic():
    assert make_arithmetic_dataset(50, seed=0) == make_arithmetic_dataset(50, seed=0)
    assert make_arithmetic_dataset(50, seed=0) != make_arithmetic_dataset(50, seed=1)
    assert make_arithmetic_dataset(20, split="test") == make_arithmetic_dataset(40, split="test")[:20]


def test_arithmetic_answers_are_correct():
    ops = {"+": int.__add__, "-": int.__sub__, "*": int.__mul__, "/": int.__floordiv__}
    rows = make_arithmetic_dataset(2000) + make_arithmetic_dataset(200, split="test")
    steps = set()
    for r in rows:
        lines = r["answer"].split("\n")
        final = re.fullmatch(r"#### (\d+)", lines[-1])
        assert final, r["answer"]
        known = {int(x) for x in re.findall(r"\d+", r["question"])} | {2}  # 2: "half"
        eqs = [EQUATION.search(line) for line in lines[:-1]]
        assert eqs and all(eqs), r["answer"]  # every worked line shows its arithmetic
        for m in eqs:
            a, op, b, c = int(m[1]), m[2], int(m[3]), int(m[4])
            assert ops[op](a, b) == c and (op != "/" or a % b == 0), m[0]
            assert a in known and b in known, (m[0], r["question"])  # operands come from the story
            known.add(c)
        assert int(final[1]) == int(eqs[-1][4])
        steps.add(len(eqs))
    assert steps == {1, 2, 3}
    assert len({r["question"] for r in rows}) == len(rows)  # no duplicates within a split
    assert len({r["question"].split()[1] for r in rows}) >= 8  # varied templates


def test_arithmetic_train_test_disjoint():
    for seed in (0, 1):
        train = {r["question"] for r in make_arithmetic_dataset(3000, seed=seed)}
        test = {r["question"] for r in make_arithmetic_dataset(500, seed=seed, split="test")}
        assert len(train) == 3000 and len(test) == 500 and not train & test
