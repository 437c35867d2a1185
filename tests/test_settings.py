"""helpers.settings: one recipe in three sizes, the `TUTORIAL_*` variables that pick one (each with a default, a
malformed value refused naming it), the typed settings file, and the TRL configs every stage is built from."""

from __future__ import annotations

import importlib.util
import json
import re
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest

from helpers import settings
from helpers.settings import (
    KNOWN,
    PROJECT_ROOT,
    VARIABLES,
    SettingsError,
    cache_root,
    full_profile,
    load_profile,
    quick_profile,
    smoke_profile,
)

# --- the profiles -------------------------------------------------------------------------------------------------


def test_full_profile_follows_the_published_recipe():
    profile = full_profile()
    assert (profile.lora.r, profile.lora.alpha, profile.lora.dropout, profile.lora.use_rslora) == (16, 16, 0.0, True)
    assert len(profile.lora.target_modules) == 7
    assert profile.dpo.beta == 0.1
    assert profile.lora.modules_to_save == ()  # full copies of an 8B model's embeddings would cost 2 GB


def test_quick_is_full_on_subsets():
    full, quick = full_profile(3), quick_profile(3)
    same = ("backend", "seed", "model_id", "reward_model_id", "lora", "sft", "dpo", "reward", "expect")
    assert all(getattr(quick, name) == getattr(full, name) for name in same)
    assert quick.data.max_sft_rows and quick.data.max_preference_rows
    assert (quick.data.sft_dataset, quick.data.preference_dataset) == (
        full.data.sft_dataset,
        full.data.preference_dataset,
    )


def test_smoke_and_full_train_the_same_dpo_loss():
    assert smoke_profile().dpo.loss_type == full_profile().dpo.loss_type
    assert smoke_profile().dpo.loss_weights == full_profile().dpo.loss_weights


def test_only_the_profile_with_a_code_judge_promises_outcomes():
    assert smoke_profile().code_judge and smoke_profile().expect is not None
    assert not full_profile().code_judge and full_profile().expect is None


def test_smoke_world_paths_follow_the_seed():
    assert "seed-3" in smoke_profile(3).model_id and "seed-3" in smoke_profile(3).data.sft_dataset
    assert smoke_profile(3).model_id != smoke_profile(4).model_id


def test_adapters_go_under_the_profile_name(tmp_path):
    profile = replace(smoke_profile(), outputs_root=str(tmp_path))
    assert profile.output_dir == tmp_path / "smoke"
    adapters = tuple(profile.adapter_dir(stage) for stage in ("sft", "dpo", "rl"))
    assert adapters == tuple(tmp_path / "smoke" / f"{stage}-adapter" for stage in ("sft", "dpo", "rl"))
    assert profile.adapter_dir("reward") == tmp_path / "smoke" / "reward-model"
    assert profile.checkpoint_dir("dpo") == tmp_path / "smoke" / "dpo-checkpoints"


def test_the_special_tokens_are_llama3s_in_id_order():
    tokens = settings.LLAMA3_SPECIAL_TOKENS
    assert len(tokens) == len(set(tokens)) == 256
    assert tokens[:2] == (settings.BOS, settings.END_OF_TEXT) and tokens[4] == settings.PAD
    assert tokens.index(settings.EOT) == 9 and tokens[-1] == "<|reserved_special_token_245|>"
    assert set(settings.CHAT_TOKENS) <= set(tokens)


# --- the TUTORIAL_* variables ---------------------------------------------------------------------------------


def settings_file(tmp_path: Path, content: object) -> str:
    path = tmp_path / "settings.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return str(path)


# What each variable does when unset, checked on a CPU machine.
DEFAULTS = {
    "TUTORIAL_PROFILE": lambda p: p.name == "smoke",
    "TUTORIAL_BACKEND": lambda p: p.backend == "hf",
    "TUTORIAL_SEED": lambda p: p.seed == 42,
    "TUTORIAL_OUTPUTS": lambda p: Path(p.outputs_root) == PROJECT_ROOT / "outputs",
    "TUTORIAL_CACHE": lambda p: Path(p.model_id).is_relative_to(PROJECT_ROOT / ".cache"),
    "TUTORIAL_SETTINGS": lambda p: p == smoke_profile(42, "hf"),
}
# A malformed value of each (a function of a temporary folder), refused with a message starting `NAME=`.
MALFORMED = {
    "TUTORIAL_PROFILE": lambda tmp: "tiny",
    "TUTORIAL_BACKEND": lambda tmp: "vllm",
    "TUTORIAL_SEED": lambda tmp: "-1",
    "TUTORIAL_OUTPUTS": lambda tmp: settings_file(tmp, "a file, not a folder"),
    "TUTORIAL_CACHE": lambda tmp: settings_file(tmp, "a file, not a folder"),
    "TUTORIAL_SETTINGS": lambda tmp: str(tmp / "missing.json"),
}


def test_every_variable_has_a_default_and_a_malformed_case():
    assert set(DEFAULTS) == set(MALFORMED) == KNOWN


@pytest.mark.parametrize("name", sorted(KNOWN))
def test_default(name, monkeypatch):
    monkeypatch.delenv("TUTORIAL_CACHE", raising=False)  # the default: `.cache/`, not the test run's folder
    assert DEFAULTS[name](load_profile({}))


@pytest.mark.parametrize("name", sorted(KNOWN))
def test_malformed_value_is_refused_naming_the_variable(name, tmp_path):
    value = MALFORMED[name](tmp_path)
    with pytest.raises(SettingsError, match=f"^{name}='?{re.escape(value)}"):
        load_profile({name: value})


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"TUTORIAL_PROFILE": "tiny"}, "TUTORIAL_PROFILE='tiny' is not one of smoke, quick, full"),
        ({"TUTORIAL_BACKEND": "vllm"}, "TUTORIAL_BACKEND='vllm' is not one of auto, unsloth, hf"),
        ({"TUTORIAL_SEED": "seven"}, "TUTORIAL_SEED='seven' must be a non-negative whole number"),
        ({"TUTORIAL_SEED": ""}, "TUTORIAL_SEED='' must be a non-negative whole number"),
    ],
)
def test_messages_say_what_is_allowed(env, message):
    with pytest.raises(SettingsError, match=re.escape(message)):
        load_profile(env)


def test_an_unknown_variable_is_refused_naming_it_and_the_known_ones():
    unknown = "TUTORIAL_" + "MAX_STEPS"  # a variable of older versions
    with pytest.raises(SettingsError, match=f"Unknown variable {unknown}; the known ones are TUTORIAL_BACKEND"):
        load_profile({unknown: "10"})


def test_environment_selects_profile_backend_seed_and_outputs():
    env = {"TUTORIAL_PROFILE": " FULL ", "TUTORIAL_BACKEND": "hf", "TUTORIAL_SEED": "7", "TUTORIAL_OUTPUTS": "out"}
    profile = load_profile(env)
    assert profile == replace(full_profile(7, "hf"), outputs_root=str(Path("out").resolve()))
    assert "seed-3" in load_profile({"TUTORIAL_SEED": "3"}).model_id  # the smoke world of that seed


def test_a_gpu_defaults_to_the_quick_profile(monkeypatch):
    monkeypatch.setattr(settings, "cuda_available", lambda: True)
    assert load_profile({"TUTORIAL_BACKEND": "hf"}).name == "quick"


def test_auto_backend_takes_hf_on_a_cpu_and_unsloth_on_a_gpu_when_it_imports(monkeypatch):
    assert settings.resolve_backend("auto", on_gpu=False) == "hf"
    assert settings.resolve_backend("auto", on_gpu=True) == "unsloth"  # unsloth is installed by `make setup`
    assert settings.resolve_backend("hf", on_gpu=True) == "hf"
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert settings.resolve_backend("auto", on_gpu=True) == "hf"


def test_cache_variable_moves_the_smoke_world(tmp_path, monkeypatch):
    monkeypatch.setenv("TUTORIAL_CACHE", str(tmp_path))
    assert cache_root() == tmp_path
    assert Path(smoke_profile(5).model_id).is_relative_to(tmp_path)


def test_cache_variable_is_read_from_the_environment_given(tmp_path, monkeypatch):
    monkeypatch.delenv("TUTORIAL_CACHE", raising=False)
    profile = load_profile({"TUTORIAL_PROFILE": "smoke", "TUTORIAL_CACHE": str(tmp_path)})
    assert Path(profile.model_id).is_relative_to(tmp_path)


# --- the settings file ------------------------------------------------------------------------------------


def test_settings_file_replaces_fields_with_their_types(tmp_path):
    overrides = {
        "sft": {"max_steps": 10, "learning_rate": 1},
        "dpo": {"loss_weights": [1, 0.5]},
        "data": {"max_sft_rows": 500, "max_preference_rows": None},
        "lora": {"target_modules": ["q_proj", "v_proj"]},
    }
    profile = load_profile({"TUTORIAL_SETTINGS": settings_file(tmp_path, overrides)})
    smoke = smoke_profile(42, "hf")
    assert profile == replace(
        smoke,
        sft=replace(smoke.sft, max_steps=10, learning_rate=1.0),
        dpo=replace(smoke.dpo, loss_weights=(1.0, 0.5)),
        data=replace(smoke.data, max_sft_rows=500, max_preference_rows=None),
        lora=replace(smoke.lora, target_modules=("q_proj", "v_proj")),
    )
    assert type(profile.sft.learning_rate) is float and type(profile.sft.max_steps) is int
    assert [type(w) for w in profile.dpo.loss_weights] == [float, float]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"sft": {"max_steps": "10"}}, "sft: max_steps must be int, got '10'"),
        ({"sft": {"max_steps": True}}, "sft: max_steps must be int, got True"),
        ({"sft": {"max_steps": 1.5}}, "sft: max_steps must be int, got 1.5"),
        ({"sft": {"packing": 1}}, "sft: packing must be bool, got 1"),
        ({"data": {"max_sft_rows": "all"}}, "data: max_sft_rows must be int or null, got 'all'"),
        ({"lora": {"target_modules": ["q_proj", 7]}}, "lora: target_modules[1] must be str, got 7"),
        ({"lora": {"target_modules": "q_proj"}}, "lora: target_modules must be tuple, got 'q_proj'"),
        ({"seed": "7"}, "seed must be int, got '7'"),
        ({"sft": 3}, "sft: expected a JSON object of settings, got 3"),
        ({"sft": {"lr": 1e-3}}, "unknown setting 'lr'; known: learning_rate"),
        ({"optimizer": "adamw"}, "unknown setting 'optimizer'"),
    ],
)
def test_settings_of_the_wrong_type_are_refused_naming_the_field(tmp_path, overrides, message):
    path = settings_file(tmp_path, overrides)
    with pytest.raises(SettingsError, match=f"^TUTORIAL_SETTINGS={re.escape(path)}.*{re.escape(message)}"):
        load_profile({"TUTORIAL_SETTINGS": path})


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"sft": {"max_steps": 10,}}', ":1: not valid JSON"),
        ("[1, 2]", "expected a JSON object of settings"),
    ],
)
def test_a_settings_file_that_does_not_parse_is_refused(tmp_path, content, message):
    with pytest.raises(SettingsError, match=re.escape(message)):
        load_profile({"TUTORIAL_SETTINGS": settings_file(tmp_path, content)})


# --- the TRL configs ------------------------------------------------------------------------------------------


def test_split_batch_divides_the_accumulation_first_then_the_per_device_batch():
    assert settings.split_batch(16, 2, 2) == (16, 1)
    assert settings.split_batch(8, 1, 2) == (4, 1)
    assert settings.split_batch(8, 4, 4) == (8, 1)
    assert settings.split_batch(8, 2, 4) == (2, 2)
    assert settings.split_batch(8, 3, 1) == (8, 3)
    with pytest.raises(SettingsError, match="neither divides by 3"):
        settings.split_batch(8, 2, 3)


def test_trainer_arguments_keep_the_effective_batch_on_two_processes(monkeypatch):
    import accelerate

    profile = full_profile(42, "hf")
    monkeypatch.setattr(accelerate, "PartialState", lambda: SimpleNamespace(num_processes=2))
    for stage in ("sft", "dpo"):
        s, args = getattr(profile, stage), settings.run_args(profile, stage)
        effective = args["per_device_train_batch_size"] * 2 * args["gradient_accumulation_steps"]
        assert effective == s.per_device_train_batch_size * s.gradient_accumulation_steps
    dpo = settings.run_args(profile, "dpo")
    assert dpo["per_device_train_batch_size"] == profile.dpo.per_device_train_batch_size
    assert settings.run_args(profile, "sft")["ddp_find_unused_parameters"] is False


def test_the_configs_come_from_the_stage_settings(tmp_profile):
    args, s = settings.dpo_config(tmp_profile), tmp_profile.dpo
    assert (args.learning_rate, args.per_device_train_batch_size, args.max_steps, args.beta) == (
        s.learning_rate,
        s.per_device_train_batch_size,
        s.max_steps,
        s.beta,
    )
    assert list(args.loss_type) == list(s.loss_type) and args.precompute_ref_log_probs is s.precompute_ref_log_probs
    assert args.seed == args.data_seed == tmp_profile.seed
    assert args.output_dir == str(tmp_profile.checkpoint_dir("dpo"))
    assert args.optim == "adamw_torch" and not args.bf16 and args.use_cpu  # on a CPU
    assert args.report_to == []  # W&B disabled in the tests
    sft = settings.sft_config(tmp_profile)
    assert sft.assistant_only_loss and sft.eval_steps == tmp_profile.sft.eval_steps
    assert (sft.num_train_epochs, sft.packing) == (tmp_profile.sft.num_train_epochs, tmp_profile.sft.packing)


def test_lora_config_trains_the_chat_token_rows_of_the_smoke_profile(tmp_profile):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tmp_profile.model_id)
    config = settings.lora_config(tmp_profile, tokenizer)
    ids = [tokenizer.convert_tokens_to_ids(t) for t in settings.CHAT_TOKENS]
    assert config.trainable_token_indices == {"embed_tokens": ids}
    assert (config.r, config.lora_alpha, config.use_rslora) == (16, 16, True)
    assert settings.lora_config(full_profile(), tokenizer).trainable_token_indices is None


def test_the_settings_table_marks_what_differs_from_the_other_profile(tmp_profile):
    table = settings.settings_table(tmp_profile, "dpo").splitlines()
    assert table[0] == "| `dpo` field | smoke | quick | why |"
    beta = next(line for line in table if line.startswith("| `beta` |"))
    assert beta.startswith("| `beta` | 0.5 ◀ | 0.1 |")
    loss = next(line for line in table if line.startswith("| `loss_type` |"))
    assert loss.startswith("| `loss_type` | sigmoid, sft | sigmoid, sft |")  # the same in both: no mark


def test_lora_scale_is_alpha_over_root_r_with_rslora():
    profile = full_profile()
    assert "scaled by α/√r = 4 (plain LoRA's α/r would be 1)" in settings.derived_numbers(profile, "sft", 100, 10.0)
    plain = replace(profile, lora=replace(profile.lora, use_rslora=False))
    assert "scaled by α/r = 1 " in settings.derived_numbers(plain, "sft", 100, 10.0)


# --- documentation ----------------------------------------------------------------------------------------


def test_readme_table_lists_every_variable_as_settings_does():
    readme = (PROJECT_ROOT / "README.md").read_text()
    rows = [line for line in readme.splitlines() if re.match(r"\| `TUTORIAL_", line)]
    assert rows == [f"| `{name}` | {meaning} | {default} |" for name, meaning, default in VARIABLES]


def test_no_file_names_a_variable_load_profile_would_refuse():
    pattern = re.compile(r"\bTUTORIAL_[A-Z][A-Z_]*\b")
    folders = ("helpers", "notebooks", "tests", "benchmarks", "deploy", "docs", ".github")
    files = [PROJECT_ROOT / name for name in ("Makefile", "README.md", "environment.yml", "launchable.yaml")]
    files += [p for folder in folders for p in (PROJECT_ROOT / folder).rglob("*") if p.is_file()]
    named = {
        (p.relative_to(PROJECT_ROOT).as_posix(), name)
        for p in files
        if p.suffix in {"", ".py", ".ipynb", ".md", ".sh", ".yml", ".yaml", ".toml"}
        for name in pattern.findall(p.read_text(errors="replace"))
    }
    unknown = sorted((path, name) for path, name in named if name not in KNOWN)
    assert not unknown, f"variables load_profile refuses: {unknown}"
