"""Data validation names each bad row (1-based line) and its problem; every file format goes the same way.

Rows follow the real schemas: FineTome-100k (`conversations` of `{from, value}`, `source`, `score`) and
orpo-dpo-mix-40k (`source`, whole conversations in `chosen`/`rejected`, string `prompt` and `question`).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from datasets import Dataset
from transformers import AutoTokenizer

from helpers import data, data_files, data_rows
from helpers.chat import apply_llama31_template
from helpers.data import load_examples
from helpers.data_files import DataError

TOXIC_REASON = "source toxic-dpo-v0.2 (dropped as the dataset card asks)"


def finetome(*turns: tuple[str, str]) -> dict:
    """A FineTome-100k row from (from, value) turns."""
    return {"conversations": [{"from": f, "value": v} for f, v in turns], "source": "infini-instruct", "score": 4.6}


def orpo(chosen: str = "2 + 2 = 4.", rejected: str = "Five.", source: str = "capybara", **columns) -> dict:
    """An orpo-dpo-mix-40k row: one user turn, then the chosen or the rejected answer."""
    user = {"role": "user", "content": "What is 2 + 2?"}
    return {
        "source": source,
        "chosen": [user, {"role": "assistant", "content": chosen}],
        "rejected": [user, {"role": "assistant", "content": rejected}],
        "prompt": user["content"],
        "question": user["content"],
    } | columns


GOOD_SFT = finetome(("system", "Be brief."), ("human", "What is 2 + 2?"), ("gpt", "4."))
GOOD_PREFERENCE = orpo()


def write_jsonl(path: Path, *lines: dict | str) -> Path:
    """Write one line per item: a dict as JSON, a string as it is."""
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


# --- one test per validation error: the row's line and the problem are reported ----------------------------

BAD_ROWS = {
    "missing column": ("sft", {"text": "What is 2 + 2? 4."}, "missing column 'conversations'"),
    "missing rejected": ("preference", {"chosen": GOOD_PREFERENCE["chosen"]}, "missing column 'rejected'"),
    "empty message": (
        "sft",
        finetome(("human", "Hi"), ("gpt", "  ")),
        "'conversations' message 2 (assistant) is empty",
    ),
    "unknown role": ("sft", finetome(("bot", "Hi"), ("gpt", "Hello.")), "message 1 has unknown role 'bot'"),
    "role not a string": ("sft", finetome((["human"], "Hi"), ("gpt", "Hello.")), "unknown role ['human']"),
    "identical": ("preference", orpo(chosen="4.", rejected=" 4. "), "chosen is identical to rejected"),
    "no final answer": ("sft", finetome(("human", "Hi"), ("gpt", "Hello."), ("human", "Bye")), "does not end with"),
    "preference no final answer": (
        "preference",
        {**GOOD_PREFERENCE, "rejected": GOOD_PREFERENCE["rejected"][:1]},
        "'rejected' does not end with an assistant turn (last role: user)",
    ),
    "messages not a list": ("preference", orpo() | {"chosen": "4."}, "'chosen' must be a non-empty list of messages"),
}


@pytest.mark.parametrize("case", BAD_ROWS, ids=list(BAD_ROWS))
def test_a_bad_row_is_dropped_and_named_with_its_line(case, tmp_path):
    kind, bad, problem = BAD_ROWS[case]
    good = GOOD_SFT if kind == "sft" else GOOD_PREFERENCE
    # Line 2 is blank: line numbers are the file's lines, not the row count.
    path = write_jsonl(tmp_path / "rows.jsonl", good, "", bad, good)
    examples, report = load_examples(str(path), kind)
    assert (report.rows_read, report.rows_usable, len(examples)) == (3, 2, 2)
    assert sum(report.dropped.values()) == 1
    [(line, text)] = report.problems
    assert line == 3 and problem in text, report.summary()
    assert f"line 3: {text}" in report.summary()


def test_reasons_are_counted(tmp_path):
    rows = [GOOD_SFT, finetome(("human", "Hi"), ("gpt", "")), finetome(("human", ""), ("gpt", "Hi")), {"text": "x"}]
    _, report = load_examples(str(write_jsonl(tmp_path / "rows.jsonl", *rows)), "sft")
    assert report.dropped == {"is empty": 2, "missing column": 1}
    assert [line for line, _ in report.problems] == [2, 3, 4]


def test_toxic_rows_are_dropped_and_counted(tmp_path):
    rows = [GOOD_PREFERENCE, orpo(source="toxic-dpo-v0.2"), GOOD_PREFERENCE, orpo(source="toxic-dpo-v0.2")]
    examples, report = load_examples(str(write_jsonl(tmp_path / "pairs.jsonl", *rows)), "preference")
    assert len(examples) == report.rows_usable == 2 and report.rows_read == 4
    assert report.dropped == {TOXIC_REASON: 2}
    assert f"dropped 2 × {TOXIC_REASON}" in report.summary()


def test_a_line_that_does_not_parse_stops_the_load_and_is_named(tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", GOOD_SFT, GOOD_SFT, '{"conversations": [', GOOD_SFT)
    with pytest.raises(DataError, match=r"rows\.jsonl:3: not valid JSON"):
        load_examples(str(path), "sft")


def test_a_line_that_is_not_utf8_is_named(tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", GOOD_SFT)
    path.write_bytes(path.read_bytes() + b'{"conversations": "\xff"}\n')
    with pytest.raises(DataError, match=r"rows\.jsonl:2: not valid JSON \(not UTF-8 text"):
        load_examples(str(path), "sft")


def test_a_json_file_that_does_not_parse_names_the_line(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text("[\n" + json.dumps(GOOD_SFT) + ",\n" + json.dumps(GOOD_SFT)[:-1] + "\n]\n")
    with pytest.raises(DataError, match=r"rows\.json:4: not valid JSON"):
        load_examples(str(path), "sft")


@pytest.mark.parametrize("kind", ["sft", "preference"])
def test_nothing_usable_stops_with_the_expected_schema(kind, tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", {"question": "q", "answer": "a"}, {"question": "q2"})
    with pytest.raises(DataError) as error:
        load_examples(str(path), kind)
    message = str(error.value)
    assert message.startswith("No usable rows: " + data.expected_schema(kind))
    assert "2 rows read, 0 usable" in message and "line 2: missing column" in message


def test_an_empty_file_is_an_error(tmp_path):
    with pytest.raises(DataError, match="no rows"):
        load_examples(str(write_jsonl(tmp_path / "rows.jsonl")), "sft")


# --- every format goes through the same checks ---------------------------------------------------------------


def write_as(path: Path, rows: list[dict]) -> Path:
    """Write `rows` in the format its suffix names (message lists as JSON text in CSV cells)."""
    if path.suffix == ".jsonl":
        return write_jsonl(path, *rows)
    if path.suffix == ".json":
        path.write_text(json.dumps({"train": rows}, indent=1))
    elif path.suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        cells = [{k: json.dumps(v) if isinstance(v, list) else v for k, v in row.items()} for row in rows]
        Dataset.from_list(cells).to_csv(path, index=False)
    return path


# The line or row number each format reports for the third row: JSON lines and CSV count lines of the file
# (a CSV's first line is its header), a JSON list and Parquet count rows.
THIRD_ROW_LINE = {".jsonl": 3, ".json": 3, ".parquet": 3, ".csv": 4}


@pytest.mark.parametrize("suffix", list(THIRD_ROW_LINE))
def test_every_format_reads_the_real_schemas_the_same_way(suffix, tmp_path):
    sft_rows = [GOOD_SFT, finetome(("human", "Hi"), ("gpt", "Hello.")), finetome(("human", "Hi"), ("gpt", ""))]
    pairs = [GOOD_PREFERENCE, orpo(source="toxic-dpo-v0.2"), orpo(chosen="Same.", rejected="Same.")]
    sft, sft_report = load_examples(str(write_as(tmp_path / f"sft{suffix}", sft_rows)), "sft")
    preference, report = load_examples(str(write_as(tmp_path / f"pairs{suffix}", pairs)), "preference")
    assert sft == load_examples(str(write_jsonl(tmp_path / "sft-ref.jsonl", *sft_rows)), "sft")[0]
    assert sft[0]["messages"][0] == {"role": "system", "content": "Be brief."}
    assert sft_report.problems == [(THIRD_ROW_LINE[suffix], "'conversations' message 2 (assistant) is empty")]
    assert preference == [
        {
            "prompt": [{"role": "user", "content": "What is 2 + 2?"}],
            "chosen": [{"role": "assistant", "content": "2 + 2 = 4."}],
            "rejected": [{"role": "assistant", "content": "Five."}],
        }
    ]
    assert report.dropped == {TOXIC_REASON: 1, "identical": 1}
    assert [line for line, _ in report.problems] == [THIRD_ROW_LINE[suffix]]


def test_explicit_prompt_messages_are_joined_to_the_answers(tmp_path):
    row = {
        "prompt": [{"role": "user", "content": "Hi"}],
        "chosen": [{"role": "assistant", "content": "Hello."}],
        "rejected": [{"role": "assistant", "content": "Go away."}],
    }
    [example], _ = load_examples(str(write_jsonl(tmp_path / "pairs.jsonl", row)), "preference")
    assert example == row


def test_hub_ids_go_to_the_hub_and_paths_do_not(tmp_path, monkeypatch):
    asked = []
    monkeypatch.setattr(data_files, "read_hub", lambda source: asked.append(source) or [(1, GOOD_SFT)])
    load_examples("mlabonne/FineTome-100k", "sft")
    assert asked == ["mlabonne/FineTome-100k"]
    with pytest.raises(DataError, match="no such file"):
        load_examples(str(tmp_path / "missing.jsonl"), "sft")
    assert asked == ["mlabonne/FineTome-100k"]


# --- length filter ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(smoke_world):
    return apply_llama31_template(AutoTokenizer.from_pretrained(smoke_world / "base-model"))


def conversation(answer: str) -> dict:
    return {"messages": [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": answer}]}


def test_length_filter_reports_what_it_removed(tokenizer):
    short, long = conversation("4."), conversation("Let me think step by step. " * 8)
    dataset = Dataset.from_list([short, long, short])
    limit = data.example_length(short, tokenizer) + 5
    assert data.example_length(long, tokenizer) > limit
    kept, message = data.filter_by_length(dataset, tokenizer, limit, "SFT train")
    assert kept["messages"] == [short["messages"], short["messages"]]
    longest = data.example_length(long, tokenizer)
    assert message == f"SFT train: kept 2 of 3 examples; removed 1 longer than {limit} tokens (longest was {longest})"


def test_max_length_shorter_than_the_prompts_is_an_error(tokenizer):
    [pair] = data.check_records([(1, GOOD_PREFERENCE)], "preference", data.LoadReport("x", "preference"))
    limit = data.prompt_length(pair, tokenizer) - 1
    with pytest.raises(DataError, match=f"DPO train: all 2 prompts alone are longer than max_length={limit} tokens"):
        data.filter_by_length(Dataset.from_list([pair, pair]), tokenizer, limit, "DPO train")


# --- the command line ------------------------------------------------------------------------------------------


def check(tmp_path: Path, kind: str, source: str | Path) -> subprocess.CompletedProcess:
    """Run `python -m helpers.data check` as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "helpers.data", "check", "--kind", kind, str(source)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )


def test_cli_reports_every_problem_and_exits_0_when_rows_are_usable(tmp_path):
    rows = [GOOD_PREFERENCE, orpo(source="toxic-dpo-v0.2"), orpo(chosen="4.", rejected="4."), {"chosen": []}]
    done = check(tmp_path, "preference", write_jsonl(tmp_path / "pairs.jsonl", *rows))
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "4 rows read, 1 usable" in out and f"dropped 1 × {TOXIC_REASON}" in out
    assert "line 3: chosen is identical to rejected" in out and "line 4: missing column 'rejected'" in out


def write_bytes(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path


CLI_FAILURES = {
    "unparseable line": ("sft", lambda d: write_jsonl(d / "a.jsonl", GOOD_SFT, "{oops"), "a.jsonl:2: not valid JSON"),
    "unrelated CSV": ("sft", lambda d: write_bytes(d / "a.csv", b"city,temp\nParis,21\n"), "an SFT row needs"),
    "wrong kind": ("preference", lambda d: write_jsonl(d / "a.jsonl", GOOD_SFT), "a preference row needs"),
    "JSON scalar": ("sft", lambda d: write_bytes(d / "a.json", b"42\n"), "expected a JSON list of rows"),
    "JSON object": ("sft", lambda d: write_jsonl(d / "a.json", {"a": 1, "b": 2}), "got a JSON dict"),
    "row not an object": ("sft", lambda d: write_jsonl(d / "a.jsonl", "[1, 2]"), "line 1: the row is not a JSON"),
    "missing file": ("sft", lambda d: d / "nowhere.jsonl", "nowhere.jsonl: no such file"),
    "folder": ("sft", lambda d: d, "is a folder"),
    "unknown file type": ("sft", lambda d: write_bytes(d / "a.txt", b"hello\n"), "unknown file type '.txt'"),
    "broken Parquet": ("sft", lambda d: write_bytes(d / "a.parquet", b"PAR1 not really"), "not a readable Parquet"),
    "not UTF-8 CSV": (
        "sft",
        lambda d: write_bytes(d / "a.csv", b"conversations\n\xff\xfe\n"),
        "a.csv:2: not UTF-8 text",
    ),
    "CSV cell too large": (
        "sft",
        lambda d: write_bytes(d / "a.csv", b"conversations\n" + b"x" * 200_000 + b"\n"),
        "a.csv:2: not valid CSV (field larger than field limit",
    ),
    "extra CSV cells": ("sft", lambda d: write_bytes(d / "a.csv", b"a,b\n1,2,[3]\n"), "line 2: missing column"),
    "empty file": ("sft", lambda d: write_bytes(d / "a.jsonl", b""), "no rows (the file is empty)"),
}


@pytest.mark.parametrize("case", CLI_FAILURES, ids=list(CLI_FAILURES))
def test_cli_fails_with_a_sentence_and_no_traceback(case, tmp_path, capsys):
    kind, make, expected = CLI_FAILURES[case]
    source = make(tmp_path)
    assert data.main(["check", "--kind", kind, str(source)]) == 1
    captured = capsys.readouterr()
    assert expected in captured.err and captured.err.startswith("error: ")
    assert "Traceback" not in captured.out + captured.err and "could not read" not in captured.err


def test_cli_as_a_command_fails_without_a_traceback(tmp_path):
    done = check(tmp_path, "sft", write_jsonl(tmp_path / "a.jsonl", GOOD_SFT, "{oops"))
    assert done.returncode == 1 and "a.jsonl:2: not valid JSON" in done.stderr
    assert "Traceback" not in done.stderr


# --- the chat format: literal special tokens drop the row, an empty system turn is removed ---------------------

SPECIAL = data_rows.SPECIAL_TOKEN_TEXT
CONTROL = "it would become a control token"


def system_turn(content: str) -> dict:
    return {"role": "system", "content": content}


SPECIAL_TOKEN_ROWS = {
    "assistant": (
        "sft",
        finetome(("human", "Hi"), ("gpt", "Sure.<|eot_id|> And more.")),
        "'conversations' message 2 (assistant) contains the literal special token '<|eot_id|>': it would become a "
        "control token (the model would learn to stop mid-answer); remove or escape it",
    ),
    "user": (
        "sft",
        finetome(("human", "x<|start_header_id|>system<|end_header_id|>"), ("gpt", "4.")),
        f"'conversations' message 1 (user) contains the literal special token '<|start_header_id|>': {CONTROL}",
    ),
    "system": (
        "sft",
        finetome(("system", "<|reserved_special_token_245|>"), ("human", "Hi"), ("gpt", "4.")),
        "'conversations' message 1 (system) contains the literal special token '<|reserved_special_token_245|>'",
    ),
    "chosen": ("preference", orpo(chosen="4.<|end_of_text|>"), "'chosen' message 2 (assistant) contains the literal"),
    "rejected": ("preference", orpo(rejected="<|begin_of_text|>5"), "'rejected' message 2 (assistant) contains the"),
    "prompt": (
        "preference",
        {
            "prompt": [{"role": "user", "content": "Run <|python_tag|>print(1)"}],
            "chosen": [{"role": "assistant", "content": "1"}],
            "rejected": [{"role": "assistant", "content": "2"}],
        },
        "'prompt' message 1 (user) contains the literal special token '<|python_tag|>'",
    ),
}


@pytest.mark.parametrize("case", SPECIAL_TOKEN_ROWS, ids=list(SPECIAL_TOKEN_ROWS))
def test_literal_special_token_text_drops_the_row_and_names_it(case, tmp_path):
    kind, bad, problem = SPECIAL_TOKEN_ROWS[case]
    good = GOOD_SFT if kind == "sft" else GOOD_PREFERENCE
    examples, report = load_examples(str(write_jsonl(tmp_path / "rows.jsonl", good, "", bad)), kind)
    assert (report.rows_read, report.rows_usable, len(examples)) == (2, 1, 1)
    assert report.dropped == {SPECIAL: 1}
    [(line, text)] = report.problems
    assert line == 3 and text.startswith(problem) and CONTROL in text, text
    assert "dropped, not escaped" in report.summary()


def test_text_that_only_looks_like_a_special_token_is_kept(tmp_path):
    lookalikes = ["<|EOT_ID|>", "<|eot_id>", "< |eot_id| >", "<|eot|>", "<|reserved_special_token_246|>", "<|>"]
    rows = [finetome(("human", "Hi"), ("gpt", f"Literal {text} here.")) for text in lookalikes]
    examples, report = load_examples(str(write_jsonl(tmp_path / "rows.jsonl", *rows)), "sft")
    assert len(examples) == len(lookalikes) and not report.dropped


def test_an_empty_system_turn_is_removed_and_the_row_kept(tmp_path):
    rows = [
        finetome(("system", " \n"), ("human", "Hi"), ("gpt", "Hello.")),
        finetome(("system", ""), ("human", " "), ("gpt", "Hello.")),  # an empty user turn still drops the row
        {
            "conversations": [
                {"from": "system", "value": None},
                {"from": "human", "value": "Hi"},
                {"from": "gpt", "value": "Yo."},
            ]
        },
        finetome(("system", "")),  # nothing left
    ]
    examples, report = load_examples(str(write_jsonl(tmp_path / "rows.jsonl", *rows)), "sft")
    assert [ex["messages"][0]["role"] for ex in examples] == ["user", "user"]
    assert report.rows_usable == 2 and report.dropped == {"is empty": 2}
    assert report.modified == {data_rows.EMPTY_SYSTEM_TURN: 2}
    assert report.changes == [
        (1, "empty system turn removed: 'conversations' message 1; the row is kept"),
        (3, "empty system turn removed: 'conversations' message 1; the row is kept"),
    ]
    assert [line for line, _ in report.problems] == [2, 4]
    assert "modified 2 × empty system turn removed (rows kept)" in report.summary()


def test_chosen_and_rejected_lose_the_same_empty_system_turn(tmp_path):
    both = orpo()
    both["chosen"], both["rejected"] = [system_turn(""), *both["chosen"]], [system_turn("  "), *both["rejected"]]
    only_chosen = orpo() | {"chosen": [system_turn("\t"), *GOOD_PREFERENCE["chosen"]]}
    explicit = {
        "prompt": [system_turn(""), {"role": "user", "content": "What is 2 + 2?"}],
        "chosen": [{"role": "assistant", "content": "2 + 2 = 4."}],
        "rejected": [{"role": "assistant", "content": "Five."}],
    }
    examples, report = load_examples(str(write_jsonl(tmp_path / "p.jsonl", both, only_chosen, explicit)), "preference")
    expected = load_examples(str(write_jsonl(tmp_path / "ref.jsonl", GOOD_PREFERENCE)), "preference")[0][0]
    assert examples == [expected] * 3 and not report.dropped
    assert report.modified == {data_rows.EMPTY_SYSTEM_TURN: 3}  # rows, not turns
    assert [text.split(": ", 1)[1] for _, text in report.changes] == [
        "'chosen' message 1, 'rejected' message 1; the row is kept",
        "'chosen' message 1; the row is kept",
        "'prompt' message 1; the row is kept",
    ]


def test_cli_prints_special_tokens_and_removed_system_turns_with_their_lines(tmp_path, capsys):
    empty_system = orpo()
    empty_system["chosen"], empty_system["rejected"] = (
        [system_turn(""), *empty_system[k]] for k in ("chosen", "rejected")
    )
    rows = [GOOD_PREFERENCE, orpo(chosen="Four.<|eot_id|>"), empty_system]
    assert data.main(["check", "--kind", "preference", str(write_jsonl(tmp_path / "p.jsonl", *rows))]) == 0
    out = capsys.readouterr().out
    assert "3 rows read, 2 usable" in out and f"dropped 1 × {SPECIAL}" in out
    assert "line 2: 'chosen' message 2 (assistant) contains the literal special token '<|eot_id|>'" in out
    assert "modified 1 × empty system turn removed (rows kept)" in out
    assert "line 3: empty system turn removed: 'chosen' message 1, 'rejected' message 1; the row is kept" in out
