"""The tuned model leaves `outputs/` intact: which model goes out, portable adapter, merged model, GGUF, chat, Hub
decision.

One DPO adapter is trained per module (or reused from the notebooks' run of this session) and merged once; the
merged model and the GGUF file are read back in a subprocess that cannot import peft or helpers. Greedy answers
must be identical on the *decisive* held-out prompts (`helpers.generation.AnswerScores.decisive`): where the model
hesitates between two tokens, bf16 or Q8_0 rounding may flip one, and that is no error of the export.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from helpers import evaluation, export, generation, model, training
from helpers.settings import (
    CHAT_TOKENS,
    END_OF_TEXT,
    EOT,
    LLAMA3_SPLIT_PATTERN,
    PROJECT_ROOT,
    LoraSettings,
    smoke_profile,
)

# The merged model and the GGUF file, loaded as a user elsewhere would: transformers only (peft and helpers
# cannot even be imported), no stop tokens passed to generate(). For each prompt: the greedy answer, and the
# model's top token at each token of the reference's answer, the stop tokens counted as one choice
# (`generation.score_answers(..., merge_stops=True)`). Prints one JSON line.
CHILD = textwrap.dedent(
    """
    import json, os, sys
    sys.modules["peft"] = sys.modules["helpers"] = None  # importing either now fails
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged_dir, gguf_path, prompts_file, max_new_tokens = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    prompts, reference_answers = json.load(open(prompts_file))
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    stops = merged.generation_config.eos_token_id

    @torch.no_grad()
    def read(model):
        out = []
        for prompt, reference in zip(prompts, reference_answers):
            text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
            ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")
            new = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)[0, ids["input_ids"].shape[1]:]
            answer = tokenizer(reference + "<|eot_id|>", add_special_tokens=False, return_tensors="pt")["input_ids"]
            forced = torch.cat([ids["input_ids"], answer], dim=1)
            logits = model(input_ids=forced).logits[0, ids["input_ids"].shape[1] - 1 : -1]
            logits[:, stops[0]] = logits[:, stops].logsumexp(-1)
            logits[:, stops[1:]] = float("-inf")
            top = logits.argmax(-1)
            out.append({"text": tokenizer.decode(new, skip_special_tokens=True).strip(), "last": new[-1].item(),
                        "length": len(new), "top": top.tolist()})
        return out

    from_gguf = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path), dtype=torch.bfloat16
    ).eval()
    print(json.dumps({
        "merged": read(merged),
        "gguf": read(from_gguf),
        "eos_token_id": merged.generation_config.eos_token_id,
        "imported": sorted(m for m in ("peft", "helpers") if sys.modules.get(m) is not None),
    }))
    """
)


def chat_token_ids(tokenizer) -> list[int]:
    return [tokenizer.convert_tokens_to_ids(t) for t in CHAT_TOKENS]


@pytest.fixture(scope="module")
def trained(smoke_world, smoke_seed, tmp_path_factory):
    """A smoke profile with trained adapters: the session's (notebooks ran first) or trained here (minutes)."""
    profile = replace(smoke_profile(smoke_seed, "hf"), outputs_root=str(tmp_path_factory.mktemp("export")))
    session = Path(os.environ.get("TUTORIAL_OUTPUTS", PROJECT_ROOT / "outputs")) / "smoke"
    folders = [profile.adapter_dir("sft"), profile.adapter_dir("dpo"), profile.output_dir / "splits"]
    if all((session / f.name).exists() for f in folders):
        for folder in folders:
            shutil.copytree(session / folder.name, folder)
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv("WANDB_MODE", "disabled")
        training.ensure(profile, "dpo")  # a no-op when the copies are current for these settings
    return profile


@pytest.fixture(scope="module")
def reference(trained):
    """The model as trained (4-bit base + adapter), held-out prompts, its greedy answers and their scores."""
    base, tokenizer = model.load_base(trained, trained.dpo.max_length)
    reference = model.load_adapter(base, trained.adapter_dir("dpo"), trainable=False).eval()
    prompts = evaluation.heldout_prompts(trained)
    answers = generation.generate(reference, tokenizer, prompts, trained.eval.max_new_tokens).texts
    scores = generation.score_answers(reference, tokenizer, prompts, answers, merge_stops=True)
    assert scores.decisive_tokens().sum() >= 20, "too few decisive tokens to compare models on"
    return reference, tokenizer, prompts, answers, scores


def agrees(reference, read: list[dict]) -> bool:
    """The subprocess's `read` of a model makes the reference's choice at every decisive token and prompt."""
    _, _, _, answers, scores = reference
    top = torch.tensor([t for r in read for t in r["top"]])
    same_choice = (top == torch.cat(scores.ids))[scores.decisive_tokens()].all()
    pairs = [(a, r["text"]) for a, r, d in zip(answers, read, scores.decisive(), strict=True) if d]
    return bool(same_choice) and all(a == b for a, b in pairs)


@pytest.fixture(scope="module")
def exported(trained, reference, tmp_path_factory):
    """The adapter merged into the dequantized weights, saved, written as Q8_0 GGUF, and read back in a subprocess."""
    prompts, answers = reference[2], reference[3]
    folder = tmp_path_factory.mktemp("exported")
    merged, tokenizer = export.merge_adapter(trained, trained.adapter_dir("dpo"), "dequantized")
    export.save_merged(merged, tokenizer, folder / "merged")
    gguf_path = export.write_gguf(folder / "merged", folder / "gguf" / "model-Q8_0.gguf")
    (folder / "prompts.json").write_text(json.dumps([prompts, answers]))
    args = [str(folder / "merged"), str(gguf_path), str(folder / "prompts.json"), str(trained.eval.max_new_tokens)]
    child = subprocess.run(
        [sys.executable, "-c", CHILD, *args], cwd=folder, capture_output=True, text=True, timeout=300, check=False
    )
    assert child.returncode == 0, child.stderr[-3000:]
    return folder, gguf_path, merged, tokenizer, json.loads(child.stdout.strip().splitlines()[-1])


# --- which model goes out ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rl_trained", "code_judge", "metrics", "stage", "says"),
    [
        (False, True, {"eval": {"rl": {"better_answer_rate": 0.9}, "dpo": {"better_answer_rate": 0.1}}}, "dpo", "only"),
        (True, True, {}, "rl", "no outside judge"),
        (True, True, {"eval": {"rl": {"better_answer_rate": 0.4}, "dpo": {"better_answer_rate": 0.6}}}, "dpo", "code"),
        (True, False, {"eval": {"rl": {"better_answer_rate": 0.4}, "dpo": {"better_answer_rate": 0.6}}}, "rl", "no "),
        (True, True, {"eval": {"rl": {"better_answer_rate": 0.5}, "dpo": {"better_answer_rate": 0.5}}}, "rl", "tie"),
        (True, True, {"eval": {"dpo": {"better_answer_rate": 0.6}}}, "rl", "no outside judge"),  # 05 ran before 06
    ],
)
def test_the_code_judge_chooses_when_there_is_no_benchmark(
    tmp_profile, monkeypatch, rl_trained, code_judge, metrics, stage, says
):
    monkeypatch.setattr(training, "is_current", lambda profile, name: name != "rl" or rl_trained)
    training.write_json_atomically(tmp_profile.output_dir / "metrics.json", metrics)
    chosen, why = export.choose_model(replace(tmp_profile, code_judge=code_judge))
    assert chosen == stage and says in why and why.startswith(stage.upper())


def test_the_benchmark_outranks_the_code_judge(tmp_profile, monkeypatch):
    monkeypatch.setattr(training, "is_current", lambda profile, name: True)
    judged = {"eval": {"rl": {"better_answer_rate": 0.9}, "dpo": {"better_answer_rate": 0.1}}}
    models = {"sft": {"prompt_loose": 0.2}, "rl": {"prompt_loose": 0.30}, "dpo": {"prompt_loose": 0.35}}
    bench = {"benchmark": {"name": "IFBench", "prompts": 50, "models": models}}
    training.write_json_atomically(tmp_profile.output_dir / "metrics.json", judged | bench)
    chosen, why = export.choose_model(tmp_profile)
    assert chosen == "dpo" and "IFBench" in why and "0.350" in why
    models["rl"]["prompt_loose"] = 0.35  # a tie: the last-trained
    training.write_json_atomically(tmp_profile.output_dir / "metrics.json", judged | bench)
    assert export.choose_model(tmp_profile)[0] == "rl"


# --- the merged model -------------------------------------------------------------------------------------------


def test_merged_model_loads_plainly_and_gives_the_adapter_models_answers(reference, exported):
    report = exported[-1]
    assert report["imported"] == []
    assert agrees(reference, report["merged"])


def test_merged_model_stops_by_its_own_generation_config(trained, reference, exported):
    tokenizer, decisive = reference[1], reference[4].decisive()
    report = exported[-1]
    stops = [tokenizer.convert_tokens_to_ids(t) for t in (EOT, END_OF_TEXT)]
    assert report["eos_token_id"] == stops
    ended = [a["last"] in stops and a["length"] < trained.eval.max_new_tokens for a in report["merged"]]
    assert any(ended) and all(e for e, d in zip(ended, decisive, strict=True) if d)  # decisive: ends with eot


def test_merged_tokenizer_has_the_inference_template(exported):
    folder = exported[0] / "merged"
    template = (folder / "chat_template.jinja").read_text()
    assert "{% generation %}" not in template and "<|eot_id|>" in template
    assert json.loads((folder / "config.json").read_text()).get("quantization_config") is None


def test_merging_into_original_weights_moves_further_from_the_trained_model(trained, reference):
    _, _, prompts, answers, scores = reference
    measured = {}
    for merge_into in export.MERGE_BASES:
        merged, merged_tokenizer = export.merge_adapter(trained, trained.adapter_dir("dpo"), merge_into)
        measured[merge_into] = generation.compare_models(
            merged, merged_tokenizer, prompts, answers, scores, trained.eval.max_new_tokens
        )
    assert generation.agrees_where_decisive(measured["dequantized"])
    assert measured["dequantized"]["mean_abs"] < 0.05
    assert measured["original"]["mean_abs"] > 2 * measured["dequantized"]["mean_abs"]


def test_merge_rejects_an_unknown_base(trained):
    with pytest.raises(ValueError, match="dequantized"):
        export.merge_adapter(trained, trained.adapter_dir("dpo"), "fp8")


# --- the adapter on its own -------------------------------------------------------------------------------------


def test_saved_adapter_carries_trained_embedding_rows_and_fixed_head_rows(trained, reference):
    """The smoke profile trains the chat tokens' `embed_tokens` rows; saving adds `lm_head`'s as fixed."""
    from safetensors.torch import load_file

    policy, tokenizer = reference[0], reference[1]
    folder, ids = trained.adapter_dir("dpo"), chat_token_ids(tokenizer)
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["trainable_token_indices"] == {"embed_tokens": ids, "lm_head": ids}
    assert model.fixed_rows(folder) == ["lm_head"]
    weights = load_file(folder / model.ADAPTER_WEIGHTS)
    saved = {k.split(".")[-3]: v for k, v in weights.items() if k.endswith("trainable_tokens_delta")}
    base, _ = model.load_base(trained, 128)
    assert torch.equal(saved["lm_head"], base.get_output_embeddings().weight[ids])
    assert not torch.allclose(saved["embed_tokens"], base.get_input_embeddings().weight[ids])  # trained
    # The project's own load applies the trained rows and leaves lm_head unwrapped (TRL's DPO loss reads it).
    assert torch.equal(policy.get_input_embeddings()(torch.tensor(ids)), saved["embed_tokens"])
    assert type(policy.get_output_embeddings()) is torch.nn.Linear


def test_project_load_of_a_second_adapter_skips_the_fixed_rows(trained):
    base, _ = model.load_base(trained, 128)
    policy = model.load_adapter(base, trained.adapter_dir("sft"), trainable=False, adapter_name="sft")
    policy = model.load_adapter(policy, trained.adapter_dir("dpo"), trainable=True, adapter_name="dpo")
    assert type(policy.get_output_embeddings()) is torch.nn.Linear
    assert set(policy.peft_config["dpo"].trainable_token_indices) == {"embed_tokens"}
    grads = {n.split(".")[-2] for n, p in policy.named_parameters() if p.requires_grad and "lora_B" in n}
    assert grads == {"dpo"}  # trainable as asked; the first adapter stays frozen


def test_saved_adapter_reloads_with_plain_peft_to_the_same_answers(trained, reference):
    _, _, prompts, answers, scores = reference
    plain, tokenizer = export.load_adapter_plainly(trained.model_id, trained.adapter_dir("dpo"))
    comparison = generation.compare_models(plain, tokenizer, prompts, answers, scores, trained.eval.max_new_tokens)
    assert generation.agrees_where_decisive(comparison)


def test_stop_tokens_count_as_one_choice(trained, reference):
    """With `merge_stops`, ending is one choice: its log-probability is that of either stop token, summed."""
    policy, tokenizer, prompts, answers, merged = reference
    split = generation.score_answers(policy, tokenizer, prompts[:4], answers[:4])
    eot, end = (tokenizer.convert_tokens_to_ids(t) for t in (EOT, END_OF_TEXT))
    for i in range(4):
        assert merged.ids[i][-1] == eot and split.logps[i][-1] < merged.logps[i][-1] <= 0  # both stops count
        assert torch.allclose(split.logps[i][:-1], merged.logps[i][:-1])  # the other tokens as they were
        assert end not in merged.top[i].tolist()  # ending is reported as <|eot_id|>


@pytest.fixture(scope="module")
def zero_rows(smoke_world, smoke_seed, tmp_path_factory):
    """A base whose chat-token rows are zero (as Llama-3.1's are), and an adapter saved from it twice: as peft
    writes it, and made portable. The adapter has random LoRA weights and no `modules_to_save`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("zero-rows")
    source = smoke_profile(smoke_seed, "hf").model_id
    base, tokenizer = AutoModelForCausalLM.from_pretrained(source), AutoTokenizer.from_pretrained(source)
    ids = chat_token_ids(tokenizer)
    with torch.no_grad():
        base.get_input_embeddings().weight[ids] = 0
        base.get_output_embeddings().weight[ids] = 0
    base.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    profile = replace(smoke_profile(smoke_seed, "hf"), model_id=str(root / "base"), lora=LoraSettings())
    policy, tokenizer = model.load_base(profile, 128)  # fixes the rows in memory
    policy = model.add_lora(policy, profile, tokenizer)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, parameter in policy.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.02)  # a fresh LoRA is a no-op: give it an effect
    policy.eval()
    for name in ("as-saved", "portable"):
        policy.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    added = model.make_adapter_portable(root / "portable", policy, tokenizer)
    return profile, policy, tokenizer, root, added


def chat_logits(policy, tokenizer) -> torch.Tensor:
    text = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}], tokenize=False)
    with torch.no_grad():
        return policy(**tokenizer(text, add_special_tokens=False, return_tensors="pt")).logits.float()


def logit_gap(policy, plain, tokenizer) -> float:
    """The largest logit difference between the model in memory and a plainly loaded one, on a chat prompt.

    The two may run different 4-bit kernels on a CPU (a few hundredths apart); missing rows cost whole units."""
    return (chat_logits(plain, tokenizer) - chat_logits(policy, tokenizer)).abs().max().item()


def test_adapter_without_the_rows_is_the_trap(zero_rows):
    profile, policy, tokenizer, root, _ = zero_rows
    plain, _ = export.load_adapter_plainly(profile.model_id, root / "as-saved")
    assert logit_gap(policy, plain, tokenizer) > 2.0


def test_portable_adapter_carries_the_rows_to_plain_peft(zero_rows):
    profile, policy, tokenizer, root, added = zero_rows
    assert added == ["embed_tokens", "lm_head"]
    config = json.loads((root / "portable" / "adapter_config.json").read_text())
    assert config["trainable_token_indices"] == dict.fromkeys(added, chat_token_ids(tokenizer))
    plain, _ = export.load_adapter_plainly(profile.model_id, root / "portable")
    assert logit_gap(policy, plain, tokenizer) < 0.25


def test_making_portable_twice_adds_nothing(zero_rows):
    _, policy, tokenizer, root, _ = zero_rows
    before = (root / "portable" / model.ADAPTER_WEIGHTS).read_bytes()
    assert model.make_adapter_portable(root / "portable", policy, tokenizer) == []
    assert (root / "portable" / model.ADAPTER_WEIGHTS).read_bytes() == before


def test_portable_adapter_merges_with_its_rows(zero_rows, tmp_path):
    from safetensors.torch import load_file, save_file

    profile, policy, tokenizer, root, _ = zero_rows
    merged, _ = export.merge_adapter(profile, root / "portable", "dequantized")
    assert type(merged.get_output_embeddings()) is torch.nn.Linear  # no peft wrapper left
    # The rows in the merged model are the adapter's, not whatever the loader put there: mark them and look.
    marked = tmp_path / "marked"
    shutil.copytree(root / "portable", marked)
    weights = load_file(marked / model.ADAPTER_WEIGHTS)
    weights |= {k: torch.full_like(v, 0.5) for k, v in weights.items() if "trainable_tokens_delta" in k}
    save_file(weights, marked / model.ADAPTER_WEIGHTS)
    ids = chat_token_ids(tokenizer)
    marked_model, _ = export.merge_adapter(profile, marked, "original")
    assert (marked_model.get_input_embeddings().weight[ids] == 0.5).all()
    assert (marked_model.get_output_embeddings().weight[ids] == 0.5).all()
    assert logit_gap(policy, merged, tokenizer) < 0.5  # bf16 rounding of the merged weights


def test_project_loads_skip_the_rows_trl_cannot_handle(zero_rows):
    profile, _, _, root, _ = zero_rows
    base, _ = model.load_base(profile, 128)
    assert model.fixed_rows(root / "portable") == ["embed_tokens", "lm_head"]
    policy = model.load_adapter(base, root / "portable", trainable=True)
    assert type(policy.get_output_embeddings()) is torch.nn.Linear  # TRL's fused DPO loss reads lm_head.bias
    assert policy.peft_config["default"].trainable_token_indices is None  # both matrices' rows were fixed ones


# --- GGUF -------------------------------------------------------------------------------------------------------


def test_gguf_reads_back_with_the_same_greedy_answers(reference, exported):
    assert agrees(reference, exported[-1]["gguf"])


def test_gguf_metadata_makes_llama_cpp_stop(exported, reference):
    import gguf

    tokenizer = reference[1]
    reader = gguf.GGUFReader(exported[1])
    field = {name: reader.fields[name].contents() for name in reader.fields}
    assert field["general.architecture"] == "llama" and field["tokenizer.ggml.model"] == "gpt2"
    assert field["tokenizer.ggml.pre"] == "llama-bpe"  # the smoke tokenizer splits text as Llama 3's does
    assert field["tokenizer.ggml.eot_token_id"] == tokenizer.convert_tokens_to_ids(EOT)
    assert field["tokenizer.ggml.eos_token_id"] == tokenizer.convert_tokens_to_ids(END_OF_TEXT)
    assert "{% generation %}" not in field["tokenizer.chat_template"]
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == types["output.weight"] == "Q8_0"
    assert types["output_norm.weight"] == "F32"


def test_rope_permutation_is_what_transformers_reader_undoes():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    weight = torch.randn(8 * 16, 24)
    permuted = export.permute_for_rope(weight, n_head=8)
    assert not torch.equal(permuted, weight)
    restored = LlamaTensorProcessor(config={})._reverse_permute_weights(permuted.numpy(), 8, 8)
    assert torch.equal(torch.from_numpy(restored), weight)


def test_llama3_rope_factors_are_metas_scaling():
    from transformers import LlamaConfig

    rope = dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0)
    rope["original_max_position_embeddings"] = 8192
    config = LlamaConfig(hidden_size=4096, num_attention_heads=32, head_dim=128, rope_parameters=rope)
    # Meta's `apply_scaling`: wavelengths under 8192 / 4 kept, over 8192 / 1 divided by 8, interpolated between.
    freqs = 1.0 / 500000.0 ** (torch.arange(0, 128, 2, dtype=torch.float64) / 128)
    smooth = ((8192 * freqs / (2 * math.pi) - 1.0) / (4.0 - 1.0)).clamp(0, 1)
    expected = freqs / ((1 - smooth) * freqs / 8.0 + smooth * freqs)
    assert torch.allclose(export.llama3_rope_factors(config).double(), expected, rtol=1e-5)
    assert expected.min() == 1.0 and expected.max() == 8.0 and ((expected > 1) & (expected < 8)).any()
    assert export.llama3_rope_factors(LlamaConfig(rope_parameters=dict(rope, rope_type="default"))) is None


def test_pre_tokenizer_names():
    llama3 = {"type": "Sequence", "pretokenizers": [{"type": "Split", "pattern": {"Regex": LLAMA3_SPLIT_PATTERN}}]}
    llama3["pretokenizers"].append({"type": "ByteLevel", "use_regex": False})
    assert export.pre_tokenizer_name({"pre_tokenizer": llama3}) == "llama-bpe"
    with pytest.raises(ValueError, match="Unknown pre-tokenizer"):
        export.pre_tokenizer_name({"pre_tokenizer": {"type": "Metaspace"}})


def test_modelfile_names_the_file_the_layout_and_the_stops(tmp_path):
    modelfile = export.write_modelfile(tmp_path / "model-Q8_0.gguf", system="Be brief.").read_text()
    assert modelfile.startswith("FROM ./model-Q8_0.gguf\n")
    assert "<|start_header_id|>{{ .Role }}<|end_header_id|>" in modelfile and 'SYSTEM """Be brief."""' in modelfile
    assert all(f'PARAMETER stop "{t}"' in modelfile for t in (EOT, END_OF_TEXT))


# --- chat and the Hub -------------------------------------------------------------------------------------------


def test_chat_streams_keeps_the_history_and_stops(exported, capsys):
    _, _, merged, tokenizer, report = exported
    prompt = [{"role": "user", "content": "What is 3 + 4?"}]
    question, pieces = prompt[0]["content"], []
    streamed = generation.stream(merged, tokenizer, prompt, pieces.append, max_new_tokens=40)
    assert len(pieces) > 1 and "".join(pieces).strip() == streamed
    assert streamed == generation.generate(merged, tokenizer, [prompt], 40).texts[0]
    chat = generation.Chat(merged, tokenizer, system="You are a helpful assistant.", max_new_tokens=40)
    first = chat.say(question)
    chat.say("And once more?")
    assert [m["role"] for m in chat.messages] == ["system", "user", "assistant", "user", "assistant"]
    assert chat.messages[2]["content"] == first and f"user: {question}\nassistant: {first}" in capsys.readouterr().out


def test_hub_push_only_when_asked_with_a_repository_and_a_token(tmp_path, monkeypatch, capsys):
    import huggingface_hub

    uploads = []

    class FakeApi:  # records what would leave the machine
        def __init__(self, token):
            self.token = token

        def create_repo(self, repo_id, private, exist_ok):
            assert private and exist_ok

        def upload_folder(self, repo_id, folder_path, commit_message):
            uploads.append((self.token, repo_id, folder_path))

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    (tmp_path / "model.safetensors").write_bytes(b"\0" * 1024)
    token = "hf_" + "x" * 34
    cases = {
        (False, "me/model", token): None,
        (True, None, token): None,
        (True, "me/model", None): None,
        (True, "me/model", token): "https://huggingface.co/me/model",
    }
    for (requested, repo_id, value), expected in cases.items():
        env = {"HF_TOKEN": value} if value else {}
        assert export.push_to_hub(requested, repo_id, tmp_path, env=env) == expected
        printed = capsys.readouterr().out
        assert "1 files" in printed and "model.safetensors" in printed and token not in printed
        assert ("no push" in printed) is (expected is None)
    assert uploads == [(token, "me/model", str(tmp_path))]  # only the last case uploads


def test_exports_are_not_committed():
    root = Path(__file__).resolve().parents[1]
    assert "outputs/" in (root / ".gitignore").read_text().splitlines()
    tracked = subprocess.run(["git", "ls-files"], cwd=root, capture_output=True, text=True, check=True).stdout
    assert not [f for f in tracked.splitlines() if f.endswith((".gguf", ".safetensors", "Modelfile"))]
