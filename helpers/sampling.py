"""Fast sampling from a 4-bit + LoRA Llama: a static KV cache and a decode step replayed as one CUDA graph.

Decoding is memory-bound: each new token reads every weight once for the whole batch. `generate` on the 4-bit
LoRA policy reaches about 3% of that bound (576 new tokens/s at batch 64 on an H200, REFERENCE §3) because each
step is about a thousand small kernel launches issued from Python. Here a step is a short Llama forward over
fixed shapes (one token per row, a KV cache of fixed length), captured once in a CUDA graph and replayed for
every token; the prompt is prefilled eagerly, and sampling (seeded) stays outside the graph. Modes:

| mode | what a decode step reads | extra memory (Llama-3.1-8B) | after the adapter changes |
|---|---|---|---|
| `merged` | a bf16 copy of the 224 linear layers, LoRA merged in (W + s·B·A) | 13.0 GiB | `refresh()` |
| `lean` | the 4-bit base through bitsandbytes' no-grad matmul, plus the LoRA product | ≤ 112 MiB | nothing |
| `generate` | transformers `generate` on the policy (today's path; the CPU fallback) | none | nothing |
| `vllm` | Unsloth's vLLM engine (`fast_inference=True`); NOT MEASURED here (no vLLM installed) | vLLM's | nothing |

All but `vllm` also hold a KV cache of rows × positions × 128 KiB for the 8B model (32 layers × 8 KV heads × 128
dims × K and V × 2 bytes): 64 rows × 512 positions is 4 GiB. `lean`'s ≤ 112 MiB is one dequantized layer at a
time (bitsandbytes uses a fused 4-bit kernel for a few rows, dequantize + matmul for more). `auto` takes
`generate` on a CPU, `merged` on a GPU with room for the copy twice over, else `lean`; which is faster where is
measured by benchmarks/bench_sampling.py. The weights and the forward are `helpers.llama_forward`'s;
`helpers.rollouts` samples TRL's RL rollouts with a `Sampler`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

import helpers.backend  # noqa: F401  (Unsloth, when selected, patches trl first)
from helpers.chat import stop_token_ids
from helpers.evaluate import Generations, model_device, render_prompt
from helpers.llama_forward import LlamaForward, _rope_frequencies

from trl.trainer.utils import use_adapter  # isort: skip  (after helpers.backend)

__all__ = ["MODES", "Sampler", "Samples"]

MODES = ("auto", "merged", "lean", "generate", "vllm")
PROMPT_BUCKET, CACHE_BUCKET = 32, 128  # prompts and the cache are padded to multiples: fewer shapes to capture


@dataclass
class Samples(Generations):
    """`Generations` (texts, num_tokens, stopped) plus the generated ids, the stop token included when one came."""

    token_ids: list[list[int]]

    @property
    def hit_max_new_tokens(self) -> list[bool]:
        return [not s for s in self.stopped]


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


class Sampler(LlamaForward):
    """Sample answers from a Llama policy (a peft `PeftModel` on a 4-bit base, possibly Unsloth-patched).

    Args:
        model: the policy. Adapters are picked per call (`adapter=None`: adapters off, the base model).
        tokenizer: its tokenizer, with the chat template and a padding token that is not a stop token.
        mode: one of `MODES` (see the module docstring).
        cuda_graph: capture and replay the decode step on a GPU (False: run it eagerly, to compare).
    """

    def __init__(self, model: Any, tokenizer: Any, mode: str = "auto", cuda_graph: bool = True):
        if mode not in MODES:
            raise ValueError(f"mode={mode!r} is not one of {', '.join(MODES)}.")
        self.model, self.tokenizer, self.cuda_graph, self.graph_error = model, tokenizer, cuda_graph, None
        self.inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.config, self.device = self.inner.config, model_device(model)
        self.stops = stop_token_ids(tokenizer)
        self.layers = self.inner.model.layers
        self.mode = self._pick(mode)
        self.merged: list[dict[str, torch.Tensor]] | None = None
        self.merged_adapter: str | None = None
        self._statics: dict | None = None
        self._graphs: dict = {}
        c = self.config
        self.heads, self.kv_heads = c.num_attention_heads, c.num_key_value_heads
        self.head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        self.inv_freq, self.rope_scale = _rope_frequencies(c, self.head_dim)
        self.inv_freq = self.inv_freq.to(self.device)

    def _pick(self, mode: str) -> str:
        fast = self.config.model_type == "llama" and not (self.config.attention_bias or self.config.mlp_bias)
        if mode in ("merged", "lean") and not fast:
            raise NotImplementedError(f"mode={mode!r} runs Llama models without biases; use mode='generate'.")
        if mode == "vllm" and getattr(self.model, "vllm_engine", None) is None:
            raise ValueError("mode='vllm' needs a model loaded by Unsloth with fast_inference=True.")
        if mode != "auto":
            return mode
        if self.device.type != "cuda" or not fast:
            return "generate"
        free, _ = torch.cuda.mem_get_info(self.device)
        return "merged" if free > 2 * self.merged_bytes() else "lean"

    # --- sampling ---------------------------------------------------------------------------------------

    def _batch(self, prompts, new_tokens, sample, temperature, generator, adapter, min_new_tokens) -> list[list[int]]:
        n = len(prompts)
        prompts = list(prompts) + [prompts[0]] * (_round_up(n, 8) - n if self.device.type == "cuda" else 0)
        width = _round_up(max(map(len, prompts)), PROMPT_BUCKET)
        self._prepare(len(prompts), _round_up(width + new_tokens, CACHE_BUCKET))
        ids = torch.full((len(prompts), width), self.tokenizer.pad_token_id)
        for r, p in enumerate(prompts):
            ids[r, width - len(p) :] = torch.tensor(p)
        s = self._statics
        s["pad"].copy_(torch.tensor([width - len(p) for p in prompts]))
        logits = self._prefill(ids.to(self.device), s["pad"], adapter)
        stops = torch.tensor(self.stops, device=self.device)
        tokens = torch.full((len(prompts), new_tokens), self.tokenizer.pad_token_id, device=self.device)
        done = torch.zeros(len(prompts), dtype=torch.bool, device=self.device)
        decode = None
        for t in range(new_tokens):
            if t < min_new_tokens:
                logits = logits.index_fill(-1, stops, float("-inf"))
            if sample:  # exponential race: argmax p / E is a draw from p
                probs = torch.softmax(logits.float() / temperature, -1)
                token = (probs / torch.empty_like(probs).exponential_(generator=generator)).argmax(-1)
            else:
                token = logits.argmax(-1)
            token = token.masked_fill(done, self.tokenizer.pad_token_id)
            tokens[:, t] = token
            done |= torch.isin(token, stops)
            if t + 1 == new_tokens or (t % 16 == 15 and t >= min_new_tokens and bool(done.all())):
                break  # a host sync only every 16 steps
            s["ids"].copy_(token[:, None])
            s["slot"].fill_(width + t)
            decode = decode or self._decoder(adapter)
            logits = decode()
        return tokens[:n].tolist()

    def _generate(self, prompts, new_tokens, sample, temperature, batch_size, adapter, min_new_tokens) -> list:
        """transformers `generate`, exactly as `helpers.evaluate.generate` calls it."""
        out = []
        with use_adapter(self.model, adapter):
            for start in range(0, len(prompts), batch_size):
                chunk = prompts[start : start + batch_size]
                width = max(map(len, chunk))
                ids = torch.tensor([[self.tokenizer.pad_token_id] * (width - len(p)) + p for p in chunk])
                mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
                tokens = self.model.generate(
                    input_ids=ids.to(self.device),
                    attention_mask=mask.to(self.device),
                    max_new_tokens=new_tokens,
                    min_new_tokens=min_new_tokens or None,
                    do_sample=sample,
                    temperature=temperature if sample else None,
                    top_p=None,
                    top_k=None,
                    eos_token_id=self.stops,
                    pad_token_id=self.tokenizer.pad_token_id,
                )
                out += tokens[:, width:].tolist()
        return out

    def _vllm(self, prompts, new_tokens, sample, temperature, seed, adapter, min_new_tokens) -> list:
        """Unsloth's vLLM engine with the live adapter. NOT MEASURED in this project (no vLLM installed here)."""
        from vllm import SamplingParams

        if adapter not in (None, "default"):
            raise NotImplementedError("Unsloth's vLLM path serves the 'default' adapter (or none) only.")
        params = SamplingParams(
            temperature=temperature if sample else 0.0,
            max_tokens=new_tokens,
            min_tokens=min_new_tokens,
            stop_token_ids=self.stops,
            seed=seed,
        )
        lora = self.model.load_lora("sampler", load_tensors=True) if adapter else None
        outputs = self.model.fast_generate(
            [{"prompt_token_ids": p} for p in prompts], sampling_params=params, lora_request=lora, use_tqdm=False
        )
        rows = []
        for o in (output.outputs[0] for output in outputs):
            ids = list(o.token_ids)
            if o.finish_reason == "stop" and (not ids or ids[-1] not in self.stops):  # keep the stop token
                ids.append(o.stop_reason if isinstance(o.stop_reason, int) else self.stops[0])
            rows.append(ids)
        return rows

    @torch.no_grad()
    def generate_ids(
        self,
        prompt_ids: Sequence[list[int]],
        max_new_tokens: int,
        sample: bool,
        temperature: float = 1.0,
        seed: int | None = 0,
        batch_size: int = 64,
        adapter: str | None = "default",
        min_new_tokens: int = 0,
    ) -> list[list[int]]:
        """Generated ids for tokenized prompts, each cut after its first stop token (kept).

        `seed=None` draws one from torch's global generator (reproducible under `transformers.set_seed`).
        `min_new_tokens` forbids the stop tokens before that many tokens (benchmarks: fixed lengths).
        """
        if adapter is not None and adapter not in getattr(self.model, "peft_config", {}):
            raise ValueError(f"No adapter {adapter!r} on the model (None means adapters off).")
        if seed is None:
            seed = int(torch.randint(2**62, ()))
        prompt_ids = [list(p) for p in prompt_ids]
        args = (max_new_tokens, sample, temperature)
        if self.mode == "generate":
            torch.manual_seed(seed)
            rows = self._generate(prompt_ids, *args, batch_size, adapter, min_new_tokens)
        elif self.mode == "vllm":
            rows = self._vllm(prompt_ids, *args, seed, adapter, min_new_tokens)
        else:
            if self.mode == "merged" and (self.merged is None or self.merged_adapter != adapter):
                self._merge(adapter)
            generator = torch.Generator(self.device).manual_seed(seed)
            rows = []
            for start in range(0, len(prompt_ids), batch_size):
                rows += self._batch(prompt_ids[start : start + batch_size], *args, generator, adapter, min_new_tokens)
        ends = [next((i for i, t in enumerate(r) if t in self.stops), None) for r in rows]
        return [r if end is None else r[: end + 1] for r, end in zip(rows, ends, strict=True)]

    def generate(self, prompts: Sequence[list[dict]], max_new_tokens: int, sample: bool, **options) -> Samples:
        """Answers to chat `prompts`, rendered with the chat template as `helpers.evaluate.generate` does.

        `options`: those of `generate_ids` (temperature, seed, batch_size, adapter, min_new_tokens).
        """
        rows = self.generate_ids([render_prompt(self.tokenizer, p) for p in prompts], max_new_tokens, sample, **options)
        stopped = [bool(r) and r[-1] in self.stops for r in rows]
        answers = [r[:-1] if s else r for r, s in zip(rows, stopped, strict=True)]
        texts = [t.strip() for t in self.tokenizer.batch_decode(answers, skip_special_tokens=True)]
        return Samples(texts, [len(a) for a in answers], stopped, rows)
