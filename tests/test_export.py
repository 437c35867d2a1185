"""The tuned model leaves `outputs/` intact: portable adapter, merged model, GGUF, chat, Hub decision.

One DPO adapter is trained per module (or reused from the notebooks' run of this session) and merged once; the
merged model and the GGUF file are read back in a subprocess that cannot import peft or helpers. Greedy answers
must be identical on the *decisive* held-out prompts (`helpers.inference.decisive`): where the model hesitates
between two tokens, bf16 or Q8_0 rounding may flip one, and that is no error of the export.
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

from helpers import export, gguf_export, inference, pipeline
from helpers.chat import END_OF_TEXT, EOT, LLAMA3_SPLIT_PATTERN
from helpers.config import PROJECT_ROOT, LoraSettings, smoke_profile
from helpers.model import load_adapter, load_base

SESSION_SEED = int(os.environ.get("TUTORIAL_SEED", 42))  # the seed the session's smoke world is built for

# The merged model and the GGUF file, loaded as a user elsewhere would: transformers only (peft and helpers
# cannot even be imported), no stop tokens passed to generate(). For each prompt: the greedy answer, and the
# model's top token at each token of the reference's answer, the stop tokens counted as one choice
# (`inference.stop_logits`). Prints one JSON line.
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


@pytest.fixture(scope="module")
def trained(smoke_world, tmp_path_factory):
    """A smoke profile with trained adapters: the session's (notebooks ran first) or trained here (about 50 s)."""
    profile = replace(smoke_profile(SESSION_SEED, "hf"), outputs_root=str(tmp_path_factory.mktemp("export")))
    session = Path(os.environ.get("TUTORIAL_OUTPUTS", PROJECT_ROOT / "outputs")) / "smoke"
    for folder in (profile.sft_adapter_dir, profile.dpo_adapter_dir):
        if (session / folder.name / "adapter_config.json").exists():
            shutil.copytree(session / folder.name, folder)
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv("WANDB_MODE", "disabled")
        pipeline.ensure_adapter(profile, "dpo")
    return profile


@pytest.fixture(scope="module")
def reference(trained):
    """The model as trained (4-bit base + adapter), held-out prompts, its greedy answers and which are decisive."""
    base, tokenizer = load_base(trained, trained.dpo.max_length)
    model = load_adapter(base, trained.dpo_adapter_dir, trainable=False).eval()
    prompts = export.heldout_prompts(trained, tokenizer)
    answers = inference.greedy_answers(model, tokenizer, prompts, trained.eval.max_new_tokens)
    scores = inference.score_answers(model, tokenizer, prompts, answers)
    assert scores.decisive_tokens().sum() >= 20, "too few decisive tokens to compare models on"
    return model, tokenizer, prompts, answers, scores


def agrees(reference, read: list[dict]) -> bool:
    """The subprocess's `read` of a model makes the reference's choice at every decisive token and prompt."""
    _, _, _, answers, scores = reference
    top = torch.tensor([t for r in read for t in r["top"]])
    same_choice = (top == torch.cat(scores.ids))[scores.decisive_tokens()].all()
    same_greedy = inference.same_share(answers, [r["text"] for r in read], scores.decisive())
    return bool(same_choice) and (math.isnan(same_greedy) or same_greedy == 1.0)  # NaN: no decisive prompt


@pytest.fixture(scope="module")
def exported(trained, reference, tmp_path_factory):
    """The adapter merged into the dequantized weights, saved, written as Q8_0 GGUF, and read back in a subprocess."""
    prompts, answers = reference[2], reference[3]
    folder = tmp_path_factory.mktemp("exported")
    merged, tokenizer = export.merge_adapter(trained, trained.dpo_adapter_dir, "dequantized")
    export.save_merged(merged, tokenizer, folder / "merged")
    gguf_path = gguf_export.write_gguf(folder / "merged", folder / "gguf" / "model-Q8_0.gguf")
    (folder / "prompts.json").write_text(json.dumps([prompts, answers]))
    args = [str(folder / "merged"), str(gguf_path), str(folder / "prompts.json"), str(trained.eval.max_new_tokens)]
    child = subprocess.run(
        [sys.executable, "-c", CHILD, *args], cwd=folder, capture_output=True, text=True, timeout=300, check=False
    )
    assert child.returncode == 0, child.stderr[-3000:]
    return folder, gguf_path, merged, tokenizer, json.loads(child.stdout.strip().splitlines()[-1])


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
        merged, merged_tokenizer = export.merge_adapter(trained, trained.dpo_adapter_dir, merge_into)
        measured[merge_into] = inference.compare_models(
            merged, merged_tokenizer, prompts, answers, scores, trained.eval.max_new_tokens
        )
    assert inference.agrees_where_decisive(measured["dequantized"])
    assert measured["dequantized"]["mean_abs"] < 0.05
    assert measured["original"]["mean_abs"] > 2 * measured["dequantized"]["mean_abs"]


def test_merge_rejects_an_unknown_base(trained):
    with pytest.raises(ValueError, match="dequantized"):
        export.merge_adapter(trained, trained.dpo_adapter_dir, "fp8")


# --- the adapter on its own -------------------------------------------------------------------------------------


def test_saved_adapter_carries_trained_embedding_rows_and_fixed_head_rows(trained, reference):
    """The smoke profile trains the chat tokens' `embed_tokens` rows; `save_adapter` adds `lm_head`'s as fixed."""
    from safetensors.torch import load_file

    model, tokenizer = reference[0], reference[1]
    folder, ids = trained.dpo_adapter_dir, export.chat_token_ids(tokenizer)
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["trainable_token_indices"] == {"embed_tokens": ids, "lm_head": ids}
    assert export.fixed_rows(folder) == ["lm_head"]
    weights = load_file(folder / export.ADAPTER_WEIGHTS)
    saved = {k.split(".")[-3]: v for k, v in weights.items() if k.endswith("trainable_tokens_delta")}
    base, _ = load_base(trained, 128)
    assert torch.equal(saved["lm_head"], base.get_output_embeddings().weight[ids])
    assert not torch.allclose(saved["embed_tokens"], base.get_input_embeddings().weight[ids])  # trained
    # The project's own load applies the trained rows and leaves lm_head unwrapped (TRL's DPO loss reads it).
    assert torch.equal(model.get_input_embeddings()(torch.tensor(ids)), saved["embed_tokens"])
    assert type(model.get_output_embeddings()) is torch.nn.Linear


def test_project_load_of_a_second_adapter_skips_the_fixed_rows(trained):
    base, _ = load_base(trained, 128)
    model = load_adapter(base, trained.sft_adapter_dir, trainable=False, adapter_name="sft")
    model = load_adapter(model, trained.dpo_adapter_dir, trainable=True, adapter_name="dpo")
    assert type(model.get_output_embeddings()) is torch.nn.Linear
    assert set(model.peft_config["dpo"].trainable_token_indices) == {"embed_tokens"}
    grads = {n.split(".")[-2] for n, p in model.named_parameters() if p.requires_grad and "lora_B" in n}
    assert grads == {"dpo"}  # trainable as asked; the first adapter stays frozen


def test_saved_adapter_reloads_with_plain_peft_to_the_same_answers(trained, reference):
    _, _, prompts, answers, scores = reference
    plain, tokenizer = export.load_adapter_plainly(trained.model_id, trained.dpo_adapter_dir)
    comparison = inference.compare_models(plain, tokenizer, prompts, answers, scores, trained.eval.max_new_tokens)
    assert inference.agrees_where_decisive(comparison)


@pytest.fixture(scope="module")
def zero_rows(smoke_world, tmp_path_factory):
    """A base whose chat-token rows are zero (as Llama-3.1's are), and an adapter saved from it twice: as peft
    writes it, and made portable. The adapter has random LoRA weights and no `modules_to_save`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from helpers.model import add_lora

    root = tmp_path_factory.mktemp("zero-rows")
    source = smoke_profile(SESSION_SEED, "hf").model_id
    base, tokenizer = AutoModelForCausalLM.from_pretrained(source), AutoTokenizer.from_pretrained(source)
    ids = export.chat_token_ids(tokenizer)
    with torch.no_grad():
        base.get_input_embeddings().weight[ids] = 0
        base.get_output_embeddings().weight[ids] = 0
    base.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    profile = replace(smoke_profile(SESSION_SEED, "hf"), model_id=str(root / "base"), lora=LoraSettings())
    model, tokenizer = load_base(profile, 128)  # fixes the rows in memory
    model = add_lora(model, profile)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.02)  # a fresh LoRA is a no-op: give it an effect
    model.eval()
    for name in ("as-saved", "portable"):
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    added = export.make_adapter_portable(root / "portable", model, tokenizer)
    return profile, model, tokenizer, root, added


def chat_logits(model, tokenizer) -> torch.Tensor:
    text = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}], tokenize=False)
    with torch.no_grad():
        return model(**tokenizer(text, add_special_tokens=False, return_tensors="pt")).logits.float()


def logit_gap(model, plain, tokenizer) -> float:
    """The largest logit difference between the model in memory and a plainly loaded one, on a chat prompt.

    The two may run different 4-bit kernels on a CPU (a few hundredths apart); missing rows cost whole units."""
    return (chat_logits(plain, tokenizer) - chat_logits(model, tokenizer)).abs().max().item()


def test_adapter_without_the_rows_is_the_trap(zero_rows):
    profile, model, tokenizer, root, _ = zero_rows
    plain, _ = export.load_adapter_plainly(profile.model_id, root / "as-saved")
    assert logit_gap(model, plain, tokenizer) > 2.0


def test_portable_adapter_carries_the_rows_to_plain_peft(zero_rows):
    profile, model, tokenizer, root, added = zero_rows
    assert added == ["embed_tokens", "lm_head"]
    config = json.loads((root / "portable" / "adapter_config.json").read_text())
    assert config["trainable_token_indices"] == dict.fromkeys(added, export.chat_token_ids(tokenizer))
    plain, _ = export.load_adapter_plainly(profile.model_id, root / "portable")
    assert logit_gap(model, plain, tokenizer) < 0.25


def test_making_portable_twice_adds_nothing(zero_rows):
    _, model, tokenizer, root, _ = zero_rows
    before = (root / "portable" / export.ADAPTER_WEIGHTS).read_bytes()
    assert export.make_adapter_portable(root / "portable", model, tokenizer) == []
    assert (root / "portable" / export.ADAPTER_WEIGHTS).read_bytes() == before


def test_portable_adapter_merges_with_its_rows(zero_rows, tmp_path):
    from safetensors.torch import load_file, save_file

    profile, model, tokenizer, root, _ = zero_rows
    merged, _ = export.merge_adapter(profile, root / "portable", "dequantized")
    assert type(merged.get_output_embeddings()) is torch.nn.Linear  # no peft wrapper left
    # The rows in the merged model are the adapter's, not whatever the loader put there: mark them and look.
    marked = tmp_path / "marked"
    shutil.copytree(root / "portable", marked)
    weights = load_file(marked / export.ADAPTER_WEIGHTS)
    weights |= {k: torch.full_like(v, 0.5) for k, v in weights.items() if "trainable_tokens_delta" in k}
    save_file(weights, marked / export.ADAPTER_WEIGHTS)
    ids = export.chat_token_ids(tokenizer)
    marked_model, _ = export.merge_adapter(profile, marked, "original")
    assert (marked_model.get_input_embeddings().weight[ids] == 0.5).all()
    assert (marked_model.get_output_embeddings().weight[ids] == 0.5).all()
    assert logit_gap(model, merged, tokenizer) < 0.5  # bf16 rounding of the merged weights


def test_project_loads_skip_the_rows_trl_cannot_handle(zero_rows):
    from peft import PeftModel

    profile, _, _, root, _ = zero_rows
    base, _ = load_base(profile, 128)
    assert export.fixed_rows(root / "portable") == ["embed_tokens", "lm_head"]
    config = export.config_without_fixed_rows(root / "portable", trainable=True)
    model = PeftModel.from_pretrained(base, str(root / "portable"), config=config, is_trainable=True)
    assert type(model.get_output_embeddings()) is torch.nn.Linear  # TRL's fused DPO loss reads lm_head.bias


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
    permuted = gguf_export.permute_for_rope(weight, n_head=8)
    assert not torch.equal(permuted, weight)
    restored = LlamaTensorProcessor(config={})._reverse_permute_weights(permuted.numpy(), 8, 8)
    assert torch.equal(torch.from_numpy(restored), weight)


def test_llama3_rope_factors_match_transformers():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0)
    rope["original_max_position_embeddings"] = 8192
    config = dict(hidden_size=4096, num_attention_heads=32, head_dim=128, rope_parameters=rope)
    plain = dict(rope, rope_type="default")
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](LlamaConfig(**config | {"max_position_embeddings": 131072}), "cpu")
    unscaled = 1.0 / 500000.0 ** (torch.arange(0, 128, 2, dtype=torch.float64) / 128)
    expected = (unscaled / scaled.double()).float()
    assert torch.allclose(gguf_export.llama3_rope_factors(config), expected, rtol=1e-4)
    assert gguf_export.llama3_rope_factors(dict(config, rope_parameters=plain)) is None


def test_pre_tokenizer_names():
    llama3 = {"type": "Sequence", "pretokenizers": [{"type": "Split", "pattern": {"Regex": LLAMA3_SPLIT_PATTERN}}]}
    llama3["pretokenizers"].append({"type": "ByteLevel", "use_regex": False})
    assert gguf_export.pre_tokenizer_name({"pre_tokenizer": llama3}) == "llama-bpe"
    assert gguf_export.pre_tokenizer_name({"pre_tokenizer": {"type": "ByteLevel", "use_regex": True}}) == "gpt-2"
    with pytest.raises(ValueError, match="Unknown pre-tokenizer"):
        gguf_export.pre_tokenizer_name({"pre_tokenizer": {"type": "Metaspace"}})


def test_modelfile_names_the_file_the_layout_and_the_stops(tmp_path):
    modelfile = gguf_export.write_modelfile(tmp_path / "model-Q8_0.gguf", system="Be brief.").read_text()
    assert modelfile.startswith("FROM ./model-Q8_0.gguf\n")
    assert "<|start_header_id|>{{ .Role }}<|end_header_id|>" in modelfile and 'SYSTEM """Be brief."""' in modelfile
    assert all(f'PARAMETER stop "{t}"' in modelfile for t in (EOT, END_OF_TEXT))


# --- chat and the Hub -------------------------------------------------------------------------------------------


def test_chat_streams_keeps_the_history_and_stops(exported, capsys):
    _, _, merged, tokenizer, report = exported
    prompt = [{"role": "user", "content": "What is 3 + 4?"}]
    question = prompt[0]["content"]
    pieces = list(inference.stream_reply(merged, tokenizer, prompt, max_new_tokens=40))
    assert len(pieces) > 1 and "".join(pieces).strip() == inference.greedy_answers(merged, tokenizer, [prompt], 40)[0]
    chat = inference.Chat(merged, tokenizer, system="You are a helpful assistant.", max_new_tokens=40)
    first = chat.say(question)
    chat.say("And once more?")
    assert [m["role"] for m in chat.messages] == ["system", "user", "assistant", "user", "assistant"]
    assert chat.messages[2]["content"] == first and f"user: {question}\nassistant: {first}" in capsys.readouterr().out


def test_stop_tokens_count_as_one_choice():
    logits = torch.tensor([[0.0, 2.0, 1.5, 1.0, 2.0]])  # ids 1 and 4 (end of text, end of turn) tie
    merged = inference.stop_logits(logits, [4, 1])
    assert merged.argmax(-1).item() == 4 and merged[0, 1] == float("-inf")
    assert torch.allclose(merged.logsumexp(-1), logits.logsumexp(-1))  # the same distribution, stopping merged


def test_hub_push_only_when_asked_with_a_repository_and_a_token(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"\0" * 1024)
    token = "hf_" + "x" * 34
    cases = {
        (False, "me/model", token): False,
        (True, None, token): False,
        (True, "me/model", None): False,
        (True, "me/model", token): True,
    }
    for (requested, repo_id, value), expected in cases.items():
        env = {"HF_TOKEN": value} if value else {}
        plan = export.plan_hub_push(requested, repo_id, tmp_path, env)
        assert plan.push is expected and plan.files == ("model.safetensors",)
        assert token not in plan.describe() and token not in repr(plan)
        if not expected:
            assert export.push_to_hub(plan, env=env) is None  # nothing leaves the machine


def test_exports_are_not_committed():
    root = Path(__file__).resolve().parents[1]
    assert "outputs/" in (root / ".gitignore").read_text().splitlines()
    tracked = subprocess.run(["git", "ls-files"], cwd=root, capture_output=True, text=True, check=True).stdout
    assert not [f for f in tracked.splitlines() if f.endswith((".gguf", ".safetensors", "Modelfile"))]
