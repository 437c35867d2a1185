"""The shapes world (benchmarks/shapes.py): its 8B config is notebook 01's Llama-3.1-8B, its data loads as written.

CPU only, a few seconds: the 8B model is built on the meta device (no memory), the world without a model.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import shapes
import torch
from transformers import LlamaForCausalLM

from helpers.theory import LLAMA_31_8B, total_params

SPECIAL_IDS = SimpleNamespace(bos_token_id=0, eos_token_id=1, pad_token_id=2)


@pytest.mark.parametrize("name", shapes.SHAPES)
def test_model_config_has_theory_sizes_and_its_parameter_count(name):
    sizes, settings = shapes.SHAPES[name]
    config = shapes.model_config(SPECIAL_IDS, name)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    assert sum(p.numel() for p in model.parameters()) == total_params(sizes)
    assert config.max_position_embeddings == settings["max_position_embeddings"]
    if name == "llama-3.1-8b":
        assert sizes is LLAMA_31_8B
        assert total_params(sizes) == 8_030_261_248
        assert config.rope_parameters["rope_type"] == "llama3" and config.rope_parameters["rope_theta"] == 500000.0


def test_world_writes_loadable_data_in_the_real_schemas(tmp_path):
    stats = shapes.build_world(tmp_path, sft_rows_n=30, preference_rows_n=20)
    assert stats["sft_example_tokens"]["rows"] == 30
    assert stats["dpo_pair_tokens_prompt_plus_longer_answer"]["rows"] == 20
    assert json.loads((tmp_path / "stats.json").read_text()) == json.loads(json.dumps(stats))
    first_sft = json.loads((tmp_path / shapes.SFT_FILE).read_text().splitlines()[0])
    assert set(first_sft) == {"conversations", "source", "score"}
    first_pair = json.loads((tmp_path / shapes.PREFERENCE_FILE).read_text().splitlines()[0])
    assert set(first_pair) == {"source", "chosen", "rejected", "prompt", "question"}
    assert "model" not in stats and not (tmp_path / shapes.MODEL_DIR).exists()


def test_settings_file_points_the_quick_profile_at_the_world_and_caps_it(tmp_path):
    from helpers.settings import load_profile, quick_profile

    (tmp_path / shapes.MODEL_DIR).mkdir()
    (tmp_path / shapes.MODEL_DIR / "config.json").write_text("{}")
    settings = tmp_path / "settings.json"
    caps = ["--max-rows", "7", "--max-steps", "3"]
    assert shapes.main(["--out", str(tmp_path), "--settings", str(settings), *caps]) == 0
    env = {"TUTORIAL_PROFILE": "quick", "TUTORIAL_BACKEND": "hf", "TUTORIAL_SETTINGS": str(settings)}
    profile = load_profile(env)
    assert profile.name == "quick" and profile.model_id == str(tmp_path.resolve() / shapes.MODEL_DIR)
    assert profile.reward_model_id is None  # no stand-in built
    assert profile.data.sft_dataset == str(tmp_path.resolve() / shapes.SFT_FILE)
    assert (profile.data.max_sft_rows, profile.data.max_preference_rows) == (7, 7)
    assert profile.sft.max_steps == profile.dpo.max_steps == profile.rl.max_steps == 3
    assert profile.eval.max_new_tokens == quick_profile().eval.max_new_tokens  # the profile's own unless capped

    assert shapes.main(["--out", str(tmp_path), "--settings", str(settings), *caps, "--max-new-tokens", "64"]) == 0
    assert load_profile(env).eval.max_new_tokens == 64


def test_settings_need_a_built_model(tmp_path):
    with pytest.raises(SystemExit):
        shapes.main(["--out", str(tmp_path), "--settings", str(tmp_path / "s.json")])
