"""Data validation names each bad row (1-based line) and its problem; every file format goes the same way; the splits
hold out whole problems, so held out means unseen.

Rows follow the real schemas: FineTome-100k (`conversations` of `{from, value}`, `source`, `score`) and
orpo-dpo-mix-40k (`source`, whole conversations in `chosen`/`rejected`, string `prompt` and `question`).
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from datasets import Dataset
from transformers import AutoTokenizer

from helpers import data
from helpers.data import DataError, load_examples
from helpers.model import apply_chat_template
from helpers.settings import full_profile, smoke_profile

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
    assert message.startswith("No usable rows: " + data.SCHEMAS[kind])
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
    import datasets

    asked = []
    monkeypatch.setattr(datasets, "load_dataset", lambda source, split: asked.append((source, split)) or [GOOD_SFT])
    load_examples("mlabonne/FineTome-100k", "sft")
    assert asked == [("mlabonne/FineTome-100k", "train")]
    with pytest.raises(DataError, match="no such file"):
        load_examples(str(tmp_path / "missing.jsonl"), "sft")
    assert asked == [("mlabonne/FineTome-100k", "train")]


# --- length filter ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(smoke_world):
    return apply_chat_template(AutoTokenizer.from_pretrained(smoke_world / "base-model"))


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
    assert message == f"SFT train: kept 2 of 3; removed 1 longer than {limit} tokens (longest was {longest})"


def test_a_pair_counts_as_its_prompt_with_the_longer_answer(tokenizer):
    pair = data.preference_example(GOOD_PREFERENCE)
    longer = max(data.count_tokens(pair["prompt"] + pair[k], tokenizer) for k in ("chosen", "rejected"))
    assert data.example_length(pair, tokenizer) == longer > data.count_tokens(pair["prompt"], tokenizer)


def test_max_length_shorter_than_every_example_is_an_error(tokenizer):
    pair = data.preference_example(GOOD_PREFERENCE)
    length = data.example_length(pair, tokenizer)
    with pytest.raises(DataError, match=f"DPO train: all 2 examples are longer than max_length={length - 1} tokens"):
        data.filter_by_length(Dataset.from_list([pair, pair]), tokenizer, length - 1, "DPO train")


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

SPECIAL = data.SPECIAL_TOKEN_TEXT
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
    assert report.modified == {data.EMPTY_SYSTEM_TURN: 2}
    assert report.changes == [
        (1, "empty system turn removed: 'conversations' message 1; row kept"),
        (3, "empty system turn removed: 'conversations' message 1; row kept"),
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
    assert report.modified == {data.EMPTY_SYSTEM_TURN: 3}  # rows, not turns
    assert [text.split(": ", 1)[1] for _, text in report.changes] == [
        "'chosen' message 1, 'rejected' message 1; row kept",
        "'chosen' message 1; row kept",
        "'prompt' message 1; row kept",
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
    assert "line 3: empty system turn removed: 'chosen' message 1, 'rejected' message 1; row kept" in out


# --- splits: held out means unseen, in any wording, in any stage ------------------------------------------------


def asked(rows, key) -> set[str]:
    """The problem keys every user turn of `rows` (conversations or pairs) asks."""
    return {k for row in rows for k in data.user_keys(data.conversation(row), key)}


@pytest.fixture
def smoke_splits(tmp_profile):
    """The smoke world's data split as a run splits it, and written to `splits/`."""
    sft, _ = data.load_dataset(tmp_profile.data.sft_dataset, "sft")
    pairs, _ = data.load_dataset(tmp_profile.data.preference_dataset, "preference")
    parts = data.split_sft(sft, tmp_profile) | data.split_preferences(pairs, tmp_profile)
    for name, part in parts.items():
        data.write_split(tmp_profile, name, part)
    return parts


def test_problem_key_ignores_wording_and_order():
    from helpers.smoke import PROMPT_TEMPLATES, problem_key

    keys = {problem_key(t.format(a=3, b=4)) for t in PROMPT_TEMPLATES} | {problem_key("Add 4 and 3.")}
    assert keys == {"3+4"} and problem_key("What is 3 + 5?") != "3+4"


def test_smoke_evaluation_problems_are_never_trained_on(tmp_profile, smoke_splits):
    key = data.key_function(tmp_profile.data.heldout_key)
    held_out = asked(smoke_splits["eval"], key)
    assert held_out and all(len(smoke_splits[name]) for name in smoke_splits)
    for name in ("sft-train", "dpo-train", "reward-train"):
        assert not held_out & asked(smoke_splits[name], key), f"{name} asks held-out problems"


def test_overlap_report_counts_zero_for_the_smoke_splits(tmp_profile, smoke_splits):
    report = data.overlap_report(tmp_profile)
    assert data.overlap_failures(report) == []
    assert report.pop("eval_pairs") == len(smoke_splits["eval"]) > 0
    assert report == dict.fromkeys(report, 0) and len(report) == 4


def test_overlap_failures_name_every_count_that_is_not_zero():
    report = {"eval_pairs": 9, "eval_problems_in_training": 2, "eval_prompts_in_training": 0}
    assert data.overlap_failures(report) == ["eval_problems_in_training = 2 (must be 0)"]


def test_the_reward_model_trains_on_pairs_dpo_never_sees(smoke_splits):
    def pair_ids(rows):
        return {str(row) for row in rows}

    assert not pair_ids(smoke_splits["reward-train"]) & pair_ids(smoke_splits["dpo-train"])


def pair(question: str, earlier: tuple[str, ...] = ()) -> dict:
    prompt = [m for q in earlier for m in ({"role": "user", "content": q}, {"role": "assistant", "content": "ok"})]
    prompt.append({"role": "user", "content": question})
    return {
        "prompt": prompt,
        "chosen": [{"role": "assistant", "content": "good"}],
        "rejected": [{"role": "assistant", "content": "bad"}],
    }


def test_full_rule_holds_out_a_prompt_in_every_spelling(tmp_path):
    profile = replace(full_profile(), outputs_root=str(tmp_path))
    profile = replace(profile, data=replace(profile.data, eval_fraction=0.5))
    questions = [f"Explain topic number {i} in simple words." for i in range(40)]
    held = next(q for q in questions if data.unit_hash(data.normalized_text(q), profile.seed) < 0.5)
    spellings = [held, held.upper(), "  " + held.replace(" ", "\n  ") + " "]
    rows = [pair(q) for q in questions + spellings[1:]] + [pair("Thanks!", earlier=(spellings[2],))]
    train, reward, evaluation = data.split_preferences(Dataset.from_list(rows), profile).values()
    assert len(reward) == 0 and len(train) and len(evaluation)
    held_out, trained = asked(evaluation, data.normalized_text), asked(train, data.normalized_text)
    assert data.normalized_text(held) in held_out and not held_out & trained
    assert sum(data.normalized_text(held) in asked([row], data.normalized_text) for row in evaluation) == 4

    for name, part in (("dpo-train", train), ("eval", evaluation)):
        data.write_split(profile, name, part)
    assert data.overlap_report(profile)["eval_prompts_in_training"] == 0


def test_overlap_report_counts_a_leaked_prompt_in_any_spelling(tmp_path):
    profile = replace(full_profile(), outputs_root=str(tmp_path))
    data.write_split(profile, "dpo-train", Dataset.from_list([pair("What is DPO?"), pair("Other.")]))
    data.write_split(profile, "eval", Dataset.from_list([pair("  what is\tdpo? "), pair("New question.")]))
    report = data.overlap_report(profile)
    assert (report["eval_pairs"], report["eval_prompts_in_training"], report["eval_problems_in_training"]) == (2, 1, 1)


def test_sft_conversation_asking_a_held_out_problem_anywhere_is_held_out(tmp_path):
    profile = replace(full_profile(), outputs_root=str(tmp_path))
    profile = replace(profile, data=replace(profile.data, eval_fraction=0.5))
    texts = [f"Question {i}?" for i in range(40)]
    held = next(t for t in texts if data.unit_hash(data.normalized_text(t), profile.seed) < 0.5)
    kept = next(t for t in texts if data.unit_hash(data.normalized_text(t), profile.seed) >= 0.5)
    conversation = [
        {"role": "user", "content": kept},
        {"role": "assistant", "content": "a"},
        {"role": "user", "content": held.lower()},
        {"role": "assistant", "content": "b"},
    ]
    other = [{"role": "user", "content": kept}, {"role": "assistant", "content": "c"}]
    train, evaluation = data.split_sft(
        Dataset.from_list([{"messages": conversation}, {"messages": other}]), profile
    ).values()
    assert (len(train), len(evaluation)) == (1, 1) and evaluation[0]["messages"] == conversation


def test_an_empty_split_is_refused_with_what_to_change(tmp_path):
    profile = replace(full_profile(), outputs_root=str(tmp_path))
    profile = replace(profile, data=replace(profile.data, eval_fraction=0.0))  # nothing held out
    with pytest.raises(ValueError, match=r"The eval split is empty: 3 rows .* eval_fraction 0.0"):
        data.split_preferences(Dataset.from_list([pair(f"Question {i}?") for i in range(3)]), profile)


def test_smoke_holds_out_the_same_number_of_problems_for_every_seed():
    from helpers.smoke import TOY_PROBLEMS

    for seed in range(30):
        position = data.positions(smoke_profile(seed))
        assert sum(position(key) < 0.2 for key in TOY_PROBLEMS) == 11  # 0.2 × 55, where a hash held out 3 to 20
        assert position("say something rude.") == data.unit_hash("say something rude.", seed)


def test_a_seeded_subset_keeps_the_original_order():
    rows = Dataset.from_list([{"i": i} for i in range(50)])
    picked = data.subset(rows, 10, seed=3)["i"]
    assert len(picked) == 10 and picked == sorted(picked) and picked == data.subset(rows, 10, seed=3)["i"]
    assert picked != data.subset(rows, 10, seed=4)["i"] and data.subset(rows, None, 3) is rows
