"""Bad inputs (issue 17): the dataset bad-row battery, a damaged model file, an output path that is a
file. Each is a one-line error naming the file and what to do, or a documented, counted skip."""
from __future__ import annotations

import csv
import json
import re

import pytest

from conftest import addition_rows, save_tiny, write_jsonl
from lopt.cli import main
from lopt.data import (IGNORE_INDEX, DataError, build_sft_dataset, describe_skips, load_records,
                       validate_dataset)
from lopt.models import ModelError, check_safetensors, load_model
from lopt.runtime.preflight import PreflightError, check_output_dir

EOT = "<|im_end|>"
GOOD = {"question": "What is 1 + 2?", "answer": "1 + 2 = 3\n#### 3"}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny-llama"))


def write_lines(path, lines: list[bytes]):
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return path


def dumps(row) -> bytes:
    return json.dumps(row).encode()


def one_line_error(fn, *args, **kw) -> str:
    with pytest.raises(DataError) as e:
        fn(*args, **kw)
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


# --------------------------------------------------------------------------- rows that are skipped


@pytest.mark.parametrize("bad_rows, reason", [
    # empty strings: a blank response is skipped; an empty prompt is kept (completion-only row)
    ([{"question": "q", "answer": ""}, {"question": "q", "answer": "  \n"}], "empty_response"),
    # missing fields, and null ones
    ([{"answer": "x"}, {"question": "q"}, {"question": None, "answer": "x"}, {"question": "q", "answer": None}],
     "missing_field"),
])
def test_pair_rows_without_prompt_or_response_are_skipped(tokenizer, tmp_path, bad_rows, reason):
    rows = [GOOD, *bad_rows, {"question": "", "answer": "kept"}, GOOD]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    examples, stats = build_sft_dataset(str(path), tokenizer)
    assert stats["rows"] == len(examples) == 3
    assert stats["skipped"] == {reason: len(bad_rows)} and stats["skipped_first"] == {reason: "line 2"}
    kept = [tokenizer.decode([i for i, l in zip(e["input_ids"], e["labels"]) if l != IGNORE_INDEX])
            for e in examples]
    assert kept == [GOOD["answer"] + EOT, "kept" + EOT, GOOD["answer"] + EOT]
    # the same counts before any tokenizer exists
    checked = validate_dataset(str(path))
    assert checked["checked"] and checked["rows"] == 3 and checked["skipped"] == stats["skipped"]


def test_chat_rows_without_an_assistant_turn_are_skipped(tokenizer, tmp_path):
    user = {"role": "user", "content": "hi"}
    rows = [{"messages": [user, {"role": "assistant", "content": "hello"}]},
            {"messages": [user]},                                            # no assistant turn
            {"messages": [{"role": "system", "content": "s"}, user, user]},  # none either
            {"messages": [user, {"role": "assistant", "content": " "}]},     # an empty one
            {"messages": None}]                                              # no conversation
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    examples, stats = build_sft_dataset(str(path), tokenizer)
    assert len(examples) == 1
    assert stats["skipped"] == {"no_assistant_turn": 2, "empty_response": 1, "missing_field": 1}
    assert stats["skipped_first"] == {"no_assistant_turn": "line 2", "empty_response": "line 4",
                                      "missing_field": "line 5"}
    assert describe_skips(stats) == (
        f"skipped 4 of 5 rows of {path} (2 with no assistant turn, first at line 2; 1 with an empty "
        f"response, first at line 4; 1 with a missing prompt or response field, first at line 5); "
        f"the rules are in help(lopt.data)")
    assert describe_skips(build_sft_dataset(str(write_jsonl(tmp_path / "ok.jsonl", rows[:1])), tokenizer)[1]) is None


def test_prompt_longer_than_max_length_is_skipped_and_counted(tokenizer, tmp_path):
    rows = [GOOD, {"question": "count " * 300, "answer": "x"}, GOOD]
    path = write_jsonl(tmp_path / "long.jsonl", rows)
    examples, stats = build_sft_dataset(str(path), tokenizer, max_length=64)
    assert len(examples) == 2 and max(len(e["input_ids"]) for e in examples) <= 64
    assert stats["skipped"] == {"prompt_too_long": 1} and stats["skipped_first"] == {"prompt_too_long": "line 2"}
    assert stats["dropped_no_response_tokens"] == 1


def test_one_megabyte_line_is_read_then_truncated_or_skipped(tokenizer, tmp_path):
    big = "word " * 200_000  # 1 MB
    rows = [GOOD, {"question": "q", "answer": big}, {"question": big, "answer": "x"}]
    path = write_jsonl(tmp_path / "big.jsonl", rows)
    assert path.stat().st_size > 2_000_000
    examples, stats = build_sft_dataset(str(path), tokenizer, max_length=128)
    assert len(examples) == 2 and stats["truncated"] == 1 and stats["skipped"] == {"prompt_too_long": 1}
    assert len(examples[1]["input_ids"]) == 128
    # CSV refuses fields over 128 KiB unless asked: a long document is still a legitimate row
    with (tmp_path / "big.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, ["question", "answer"])
        w.writeheader()
        w.writerows(rows[:2])
    assert load_records(str(tmp_path / "big.csv"))[1]["answer"] == big
    assert csv.field_size_limit() == 131072  # the module-wide limit is left as it was


# --------------------------------------------------------------------------- values that are errors


def test_numbers_where_text_belongs_become_text(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "n.jsonl", [{"question": 12, "answer": 42}, {"question": 1.5, "answer": "x"}])
    examples, stats = build_sft_dataset(str(path), tokenizer)
    assert stats["rows"] == 2 and not stats["skipped"]
    assert tokenizer.decode(examples[0]["input_ids"]).startswith("<|im_start|>user\n12<|im_end|>")
    assert tokenizer.decode([i for i, l in zip(examples[0]["input_ids"], examples[0]["labels"])
                             if l != IGNORE_INDEX]) == "42" + EOT


@pytest.mark.parametrize("bad, expect", [
    ({"question": {"text": "q"}, "answer": "a"}, "line 2: 'question' must be text, got dict"),
    ({"question": "q", "answer": True}, "line 2: 'answer' must be text, got bool"),
    ({"question": "q\ud800", "answer": "a"}, "line 2: 'question' holds an unpaired UTF-16 surrogate"),
])
def test_wrong_kind_of_value_names_file_line_and_column(tokenizer, tmp_path, bad, expect):
    path = write_jsonl(tmp_path / "w.jsonl", [GOOD, bad])
    for fn, args in ((build_sft_dataset, (str(path), tokenizer)), (validate_dataset, (str(path),))):
        msg = one_line_error(fn, *args)
        assert msg.startswith(f"{path} {expect}"), msg


def test_chat_of_wrong_shape_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": "hello"}])
    assert one_line_error(validate_dataset, str(path)).startswith(
        f"{path} line 1: 'messages' must be a list of {{'role', 'content'}} messages, got str")


# --------------------------------------------------------------------------- encodings


def test_invalid_utf8_in_one_row_names_line_and_byte(tmp_path):
    lines = [dumps(GOOD), b"", b'{"question": "caf\xe9", "answer": "x"}', dumps(GOOD)]
    path = write_lines(tmp_path / "one.jsonl", lines)
    byte = len(lines[0]) + 1 + 1 + lines[2].index(b"\xe9")
    msg = one_line_error(load_records, str(path))
    assert msg.startswith(f"{path} line 3: not UTF-8 text (byte 0xe9 at byte {byte}); re-encode the file as UTF-8"), msg
    assert path.read_bytes()[byte] == 0xE9
    # the same for the whole-file readers, found before a model would load
    (tmp_path / "one.json").write_bytes(b"[\n" + dumps(GOOD) + b",\n" + lines[2] + b"\n]\n")
    assert one_line_error(validate_dataset, str(tmp_path / "one.json")).startswith(
        f"{tmp_path / 'one.json'} line 3: not UTF-8 text (byte 0xe9")
    (tmp_path / "one.csv").write_bytes(b"question,answer\nq,a\ncaf\xe9,x\n")
    assert one_line_error(validate_dataset, str(tmp_path / "one.csv")).startswith(
        f"{tmp_path / 'one.csv'} line 3: not UTF-8 text (byte 0xe9 at byte 23)")


def test_whole_file_in_another_encoding(tmp_path):
    rows = [{"question": "Combien coûte un café ?", "answer": "2 €"}]
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("cp1252"))
    msg = one_line_error(validate_dataset, str(latin))
    assert msg.startswith(f"{latin} line 1: not UTF-8 text") and "iconv" in msg
    utf16 = tmp_path / "u16.jsonl"
    utf16.write_text(json.dumps(rows[0], ensure_ascii=False) + "\n", encoding="utf-16")
    msg = one_line_error(validate_dataset, str(utf16))
    assert msg.startswith(f"{utf16} line 1: not UTF-8 text (byte 0xff at byte 0): the file is UTF-16"), msg
    # a UTF-8 byte-order mark is fine
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + json.dumps(rows[0], ensure_ascii=False).encode() + b"\n")
    assert load_records(str(bom)) == rows


# --------------------------------------------------------------------------- validate_dataset


def test_validate_dataset_catches_file_problems_without_a_tokenizer(tmp_path):
    assert one_line_error(validate_dataset, str(tmp_path / "missing.jsonl")).endswith(
        "relative paths are taken from " + str(__import__("pathlib").Path.cwd()) + ")")
    cols = write_jsonl(tmp_path / "cols.jsonl", [{"text": "a"}])
    assert one_line_error(validate_dataset, str(cols)).startswith(f"{cols}: unrecognised columns ['text']")
    empty = write_jsonl(tmp_path / "empty.jsonl", [{"question": "q", "answer": ""}])
    assert one_line_error(validate_dataset, str(empty)).startswith(f"{empty}: no usable row")
    assert one_line_error(validate_dataset, str(cols), max_length=1).startswith("max_length must be at least 2")
    ok = validate_dataset("arithmetic", limit=20)
    assert ok == {"source": "arithmetic", "format": "question_answer", "rows": 20, "skipped": {},
                  "skipped_first": {}, "checked": True}
    # a hub dataset is left to load time (no network here)
    assert validate_dataset("someone/some-dataset") == {"source": "someone/some-dataset", "checked": False}


def test_unreadable_file_is_one_line(tmp_path, monkeypatch):
    import lopt.data as data

    path = write_jsonl(tmp_path / "locked.jsonl", [GOOD])

    def deny(p):
        raise PermissionError(13, "Permission denied", str(p))

    monkeypatch.setitem(data._READERS, ".jsonl", deny)
    assert one_line_error(load_records, str(path)) == (
        f"{path}: cannot read the file (Permission denied); check its permissions")


# --------------------------------------------------------------------------- the CLI fails before loading


@pytest.fixture
def no_model_load(monkeypatch):
    """Loading a model fails the test: the checks must come first."""
    import lopt.models

    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the bad input was found")

    monkeypatch.setattr(lopt.models, "load_model", refuse)


def cli_error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("lopt ")]
    assert len(lines) == 1, err
    return lines[0]


def test_cli_bad_dataset_fails_before_the_model_loads(tmp_path, capsys, no_model_load):
    bad = write_lines(tmp_path / "bad.jsonl", [dumps(GOOD), b'{"question": "\xff", "answer": "x"}'])
    line = cli_error(capsys, ["train", "--model", "unused", "--dataset", str(bad),
                              "--output-dir", str(tmp_path / "out"), "--no-progress"])
    assert line.startswith(f"lopt train: error: {bad} line 2: not UTF-8 text"), line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["train", "grpo", "dpo"])
def test_cli_output_dir_that_is_a_file(tmp_path, capsys, no_model_load, command):
    taken = tmp_path / "taken"
    taken.write_text("not a directory")
    data = write_jsonl(tmp_path / "d.jsonl", addition_rows())
    source = ["--task" if command == "grpo" else "--dataset", str(data)]
    line = cli_error(capsys, [command, "--model", "unused", *source, "--output-dir", str(taken)])
    assert line == (f"lopt {command}: error: --output-dir {taken} is an existing file, not a directory; "
                    f"pass a directory path (new or existing)")
    assert taken.read_text() == "not a directory"
    line = cli_error(capsys, [command, "--model", "unused", *source, "--output-dir", str(taken / "run")])
    assert line == f"lopt {command}: error: --output-dir {taken / 'run'} cannot be created: {taken} is a file; choose another path"


def test_check_output_dir_accepts_new_and_existing_dirs(tmp_path):
    assert check_output_dir(tmp_path) == tmp_path
    assert check_output_dir(tmp_path / "a" / "b") == tmp_path / "a" / "b"
    assert not (tmp_path / "a").exists()  # creates nothing
    with pytest.raises(PreflightError):
        check_output_dir(write_jsonl(tmp_path / "f", []))


def test_skips_are_printed_once_and_recorded_in_the_run_file(tiny_dir, tmp_path, capsys):
    rows = addition_rows()[:8] + [{"question": "q", "answer": ""}, {"question": "q"}]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    out = tmp_path / "out"
    assert main(["train", "--model", str(tiny_dir), "--dataset", str(data), "--output-dir", str(out),
                 "--max-steps", "1", "--batch-size", "4", "--no-progress"]) == 0
    err = capsys.readouterr().err
    skips = [ln for ln in err.splitlines() if "skipped" in ln]
    assert skips == [f"lopt: skipped 2 of 10 rows of {data} (1 with an empty response, first at line 9; "
                     f"1 with a missing prompt or response field, first at line 10); the rules are in help(lopt.data)"]
    info = json.loads((out / "lopt_run.json").read_text())
    assert info["final_metrics"]["data"]["skipped"] == {"empty_response": 1, "missing_field": 1}


# --------------------------------------------------------------------------- a damaged model file


@pytest.mark.parametrize("damage", ["half", "empty", "header", "junk"])
def test_truncated_or_corrupt_safetensors_is_one_line(tmp_path, damage):
    d = save_tiny(tmp_path / "m")
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes({"half": data[: len(data) // 2], "empty": b"", "header": data[:8] + b"X" + data[9:],
                   "junk": b"<html>404 not found</html>"}[damage])
    with pytest.raises(ModelError) as e:
        load_model(str(d), device="cpu")
    msg = str(e.value)
    assert msg.startswith(f"{f} is truncated or corrupt (") and "re-download it or re-save" in msg
    assert "\n" not in msg


def test_corrupt_weights_past_the_header_check_are_one_line(tmp_path, monkeypatch):
    import lopt.models

    d = save_tiny(tmp_path / "m")
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    monkeypatch.setattr(lopt.models, "check_safetensors", lambda directory: None)
    with pytest.raises(ModelError, match=re.escape(f"the weights of {d} are corrupt (")):
        load_model(str(d), device="cpu")


def test_check_safetensors_passes_sound_and_sharded_checkpoints(tmp_path):
    from conftest import make_tiny_model

    check_safetensors(save_tiny(tmp_path / "one"))
    make_tiny_model().save_pretrained(tmp_path / "shards", max_shard_size="20KB")
    shards = sorted((tmp_path / "shards").glob("*.safetensors"))
    assert len(shards) > 1
    check_safetensors(tmp_path / "shards")
    shards[-1].write_bytes(shards[-1].read_bytes()[:-1])
    with pytest.raises(ModelError, match=re.escape(f"{shards[-1]} is truncated or corrupt (truncated: ")):
        check_safetensors(tmp_path / "shards")


def test_cli_truncated_model_is_one_line(tiny_dir, tmp_path, capsys):
    import shutil

    d = shutil.copytree(tiny_dir, tmp_path / "m")
    (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:5000])
    data = write_jsonl(tmp_path / "d.jsonl", addition_rows())
    line = cli_error(capsys, ["train", "--model", str(d), "--dataset", str(data),
                              "--output-dir", str(tmp_path / "out"), "--no-progress"])
    assert line.startswith(f"lopt train: error: {d / 'model.safetensors'} is truncated or corrupt (truncated: 5000 bytes")


def test_damaged_embedded_cache_is_rebuilt_not_trusted(tmp_path):
    from lopt.models import _REQUIRED_FILES, CACHE_MARKER, CACHE_VERSION, _cache_is_valid

    d = save_tiny(tmp_path / "cache")
    (d / CACHE_MARKER).write_text(json.dumps({"lopt_cache_version": CACHE_VERSION}))
    assert all((d / name).is_file() for name in _REQUIRED_FILES) and _cache_is_valid(d)
    (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:-10])
    assert not _cache_is_valid(d)
