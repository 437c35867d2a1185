"""Fast sampling from a Llama (4-bit + LoRA, or plain): a static KV cache and a decode step replayed as one CUDA
graph. A part of its own, beside the tutorial's `helpers` (it imports none of them): `helpers.generation.generate`
uses it on a GPU, and so do RL's rollouts (`helpers.training.FastRLOOTrainer`). Its tests: `tests/test_sampler.py`.

Decoding is memory-bound: each new token reads every weight once for the whole batch. transformers' `generate` on
the 4-bit LoRA policy reaches about 3% of that bound (576 new tokens/s at batch 64 on an H200) because each step is
about a thousand small kernel launches issued from Python. Here a step is a short Llama forward over fixed shapes
(one token a row, a KV cache of fixed length), transformers' Llama op for op, captured once in a CUDA graph and
replayed for every token; the prompt is prefilled eagerly, and sampling (seeded) stays outside the graph. Modes:

| mode | what a decode step reads | extra memory (Llama-3.1-8B) | after the adapter changes |
|---|---|---|---|
| `merged` | a bf16 copy of the 224 linear layers, LoRA merged in (W + s·B·A) | 13.0 GiB | `refresh()` |
| `lean` | the weights as they are (4-bit through bitsandbytes' matmul), plus the LoRA product | ≤ 112 MiB | nothing |

Both hold a KV cache of rows × positions × 128 KiB for the 8B model (32 layers × 8 KV heads × 128 dims × K and V × 2
bytes): 64 rows × 512 positions is 4 GiB. `auto` takes `merged` for a quantized or LoRA model when the GPU has room
for the copy twice over (by `free_bytes`, which the caller may cap), else `lean`; a plain bf16 model is
read as it is. Measured: benchmarks/bench_sampling.py. It needs CUDA for speed but runs on a CPU too (the tests).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

MODES = ("auto", "merged", "lean")
PROMPT_BUCKET, CACHE_BUCKET = 32, 128  # prompts and the cache are padded to multiples: fewer shapes to capture
STOP_TOKENS = ("<|eot_id|>", "<|end_of_text|>")  # what ends a Llama 3 assistant turn: end of turn, end of text


def stop_token_ids(tokenizer: Any) -> list[int]:
    """The ids of `STOP_TOKENS`: the tokens that end an answer."""
    return [tokenizer.convert_tokens_to_ids(t) for t in STOP_TOKENS]


@dataclass
class Generations:
    """Answers to a list of prompts: the texts, their length in tokens (the stop token not counted), whether each ended
    by itself (False: cut at `max_new_tokens`), and the generated ids (the stop token included when one came)."""

    texts: list[str]
    num_tokens: list[int]
    stopped: list[bool]
    token_ids: list[list[int]]

    def stopped_share(self) -> float:
        return sum(self.stopped) / len(self.stopped)


def render_prompt(tokenizer: Any, prompt: list[dict]) -> list[int]:
    """Token ids of a chat prompt rendered with the chat template, ending with the assistant header."""
    return tokenizer.apply_chat_template(prompt, add_generation_prompt=True, return_dict=True)["input_ids"]


def decode(tokenizer: Any, rows: list[list[int]]) -> Generations:
    """`Generations` of generated id rows, each cut after its first stop token (kept in `token_ids`)."""
    stops = set(stop_token_ids(tokenizer))
    ends = [next((i for i, t in enumerate(r) if t in stops), None) for r in rows]
    rows = [r if end is None else r[: end + 1] for r, end in zip(rows, ends, strict=True)]
    answers = [r if end is None else r[:-1] for r, end in zip(rows, ends, strict=True)]
    texts = [t.strip() for t in tokenizer.batch_decode(answers, skip_special_tokens=True)]
    return Generations(texts, [len(a) for a in answers], [end is not None for end in ends], rows)


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


# Projections by what one matrix multiply computes in the merged copy: [q|k|v] and [gate|up] are fused.
GROUPS = {
    "qkv": ("self_attn", ("q_proj", "k_proj", "v_proj")),
    "o": ("self_attn", ("o_proj",)),
    "gate_up": ("mlp", ("gate_proj", "up_proj")),
    "down": ("mlp", ("down_proj",)),
}
PREFILL_TOKENS = 16384  # rows × prompt tokens prefilled at once (bounds the prefill's activations)


def _lora(module: Any, adapter: str | None) -> tuple[Any, Any, Any, float]:
    """(base layer, A, B, scaling) of one projection for `adapter`; A and B are None without its LoRA."""
    base = getattr(module, "base_layer", module)
    if adapter is None or adapter not in getattr(module, "lora_A", {}):
        return base, None, None, 0.0
    if module.use_dora.get(adapter) or module.lora_B[adapter].bias is not None:
        raise NotImplementedError("DoRA and LoRA biases are not supported: use transformers' generate.")
    return base, module.lora_A[adapter].weight, module.lora_B[adapter].weight, module.scaling[adapter]


def _saved(module: Any, adapter: str | None) -> Any:
    """The copy of a peft `modules_to_save` module (embeddings, head) that `adapter` uses, else the module."""
    copies = getattr(module, "modules_to_save", None)
    if copies is None:
        return module
    return copies[adapter] if adapter is not None and adapter in copies else module.original_module


def _weight(module: Any, adapter: str | None, indices: dict) -> torch.Tensor:
    """The embeddings' or head's weight as `adapter` sees it: its `modules_to_save` copy, or the base weight with the
    adapter's trainable-token rows in place. peft's own `.weight` merges the *active* adapters' rows through an index
    built on the host at every call, which a CUDA graph cannot capture: `indices` keeps it on the device."""
    tokens = getattr(module, "token_adapter", None)  # peft's TrainableTokensWrapper
    if tokens is None:
        return _saved(module, adapter).weight
    weight = tokens.base_layer.weight
    if adapter not in tokens.trainable_tokens_delta:
        return weight
    if (id(tokens), adapter) not in indices:  # built in an eager step (prefill, warm-up), never while capturing
        indices[id(tokens), adapter] = torch.tensor(tokens.token_indices[adapter], device=weight.device)
    return weight.index_copy(0, indices[id(tokens), adapter], tokens.trainable_tokens_delta[adapter].to(weight.dtype))


def _rope_frequencies(config: Any, head_dim: int) -> tuple[torch.Tensor, float]:
    """RoPE's inverse frequencies and scale, as transformers' `LlamaRotaryEmbedding` computes them."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = config.rope_parameters
    if rope["rope_type"] != "default":
        inv_freq, scale = ROPE_INIT_FUNCTIONS[rope["rope_type"]](config, None)
        return inv_freq.float(), scale
    return 1.0 / rope["rope_theta"] ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim), 1.0


def _quant_state(base: Any) -> Any:
    """bitsandbytes' quantization state of a 4-bit layer (on its weight, or on the module), None for a plain one."""
    state = getattr(base.weight, "quant_state", None)
    return getattr(base, "quant_state", None) if state is None else state


def _linear(x: torch.Tensor, base: Any) -> torch.Tensor:
    """`base(x)` for a bitsandbytes 4-bit or plain linear layer, without its module hooks."""
    state = _quant_state(base)
    if state is None:
        return F.linear(x, base.weight, base.bias)
    import bitsandbytes as bnb

    return bnb.matmul_4bit(x, base.weight, quant_state=state, bias=base.bias)


def dequantize(base: Any, out: torch.Tensor) -> torch.Tensor:
    """Write the dense weight of a bitsandbytes 4-bit (or plain) linear layer into `out`."""
    state = _quant_state(base)
    if state is None:
        return out.copy_(base.weight)
    import bitsandbytes as bnb

    if getattr(state, "packing_format_for_cpu", False):  # bitsandbytes' CPU inference layout: go through its kernel
        eye = torch.eye(out.shape[1], dtype=out.dtype, device=out.device)
        return out.copy_(bnb.matmul_4bit(eye, base.weight, quant_state=state).t())
    if out.is_cuda:  # straight into place (bitsandbytes has no `out=` kernel on a CPU)
        return bnb.functional.dequantize_4bit(base.weight.data, state, out=out)
    return out.copy_(bnb.functional.dequantize_4bit(base.weight.data, state))


class LlamaForward:
    """The weights and the forward `Sampler` decodes with, its base: `Sampler.__init__` sets what these methods read
    (the model and its layers, device, mode, attention shapes, RoPE frequencies, the merged copy, the static inputs
    and the captured graphs)."""

    def _projections(self) -> list[Any]:
        return [getattr(getattr(layer, o), n) for layer in self.layers for o, ns in GROUPS.values() for n in ns]

    def merged_bytes(self) -> int:
        """Size of the merged copy: every projection of every layer in the compute dtype."""
        return sum(_lora(m, None)[0].in_features * _lora(m, None)[0].out_features * 2 for m in self._projections())

    # --- the weights ------------------------------------------------------------------------------------

    @torch.no_grad()
    def refresh(self) -> None:
        """Make the merged copy match the adapter's current weights (call after every change to them).

        In place: W = dequantize(W4) + s·B·A, one rounding to bf16, with the base re-read from its 4-bit form, so
        no error accumulates over many refreshes and captured graphs stay valid. A no-op in the other modes,
        which read the adapter itself.
        """
        if self.mode == "merged" and self.merged is not None:
            self._merge(self.merged_adapter)

    def _merge(self, adapter: str | None) -> None:
        dtype = self.inner.model.embed_tokens.weight.dtype
        first = self.merged is None
        if first:
            self.merged = [{} for _ in self.layers]
        for i, layer in enumerate(self.layers):
            for group, (owner, names) in GROUPS.items():
                parts = [_lora(getattr(getattr(layer, owner), n), adapter) for n in names]
                if first:
                    rows = sum(base.out_features for base, *_ in parts)
                    self.merged[i][group] = torch.empty(rows, parts[0][0].in_features, dtype=dtype, device=self.device)
                start = 0
                for base, a, b, scale in parts:
                    out = dequantize(base, self.merged[i][group][start : start + base.out_features])
                    if a is not None:
                        out.addmm_(b.to(dtype), a.to(dtype), alpha=scale)
                    start += base.out_features
        self.merged_adapter = adapter

    def _project(self, i: int, group: str, x: torch.Tensor, adapter: str | None) -> torch.Tensor:
        if self.mode == "merged":
            return F.linear(x, self.merged[i][group])
        owner, names = GROUPS[group]
        outs = []
        for name in names:  # as peft computes a LoRA layer: base(x) + (B(A(x)) · s) in the adapter's dtype
            base, a, b, scale = _lora(getattr(getattr(self.layers[i], owner), name), adapter)
            y = _linear(x, base)
            outs.append(y if a is None else y + (F.linear(F.linear(x.to(a.dtype), a), b) * scale).to(y.dtype))
        return torch.cat(outs, -1) if len(outs) > 1 else outs[0]

    # --- the forward: transformers' Llama, op for op, over a static cache ---------------------------------

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        h = x.float()
        return weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.config.rms_norm_eps)).to(x.dtype)

    def _forward(self, ids, pos, slots, mask, rows, adapter) -> torch.Tensor:
        """Logits (B, V) after the last of `ids` (B, T) at positions `pos` (B, T); writes K/V at cache `slots` (T,).

        `mask` (B, 1, T, S) says which cache slots each query sees (S: the whole cache when decoding, T = 1).
        """
        cache = self._statics["cache"]
        batch, width = ids.shape
        heads, kv_heads, dim = self.heads, self.kv_heads, self.head_dim
        x = F.embedding(ids, _weight(self.inner.model.embed_tokens, adapter, self._token_rows))
        freqs = torch.cat([pos[..., None].float() * self.inv_freq] * 2, -1)
        cos, sin = ((f * self.rope_scale).to(x.dtype)[:, None] for f in (freqs.cos(), freqs.sin()))

        def rope(t: torch.Tensor) -> torch.Tensor:
            return t * cos + torch.cat((-t[..., dim // 2 :], t[..., : dim // 2]), -1) * sin

        for i, layer in enumerate(self.layers):
            h = self._norm(x, layer.input_layernorm.weight)
            q, k, v = self._project(i, "qkv", h, adapter).split((heads * dim, kv_heads * dim, kv_heads * dim), -1)
            q = rope(q.view(batch, width, heads, dim).transpose(1, 2))  # (B, H, T, D)
            keys, values = cache[i, 0, rows], cache[i, 1, rows]  # (B, KV, L, D)
            keys.index_copy_(2, slots, rope(k.view(batch, width, kv_heads, dim).transpose(1, 2)))
            values.index_copy_(2, slots, v.view(batch, width, kv_heads, dim).transpose(1, 2))
            if width == 1:  # decoding: a KV head's query heads as that many queries, nothing copied
                q = q.reshape(batch, kv_heads, heads // kv_heads, dim)
            else:  # prefill, once per batch: expand the KV heads
                seen = mask.shape[-1]
                keys, values = (t[:, :, :seen].repeat_interleave(heads // kv_heads, 1) for t in (keys, values))
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=dim**-0.5)
            out = out if width == 1 else out.transpose(1, 2)
            x = x + self._project(i, "o", out.reshape(batch, width, heads * dim), adapter)
            h = self._norm(x, layer.post_attention_layernorm.weight)
            gate, up = self._project(i, "gate_up", h, adapter).chunk(2, -1)
            x = x + self._project(i, "down", F.silu(gate) * up, adapter)
        x = self._norm(x[:, -1], self.inner.model.norm.weight)
        return F.linear(x, _weight(self.inner.lm_head, adapter, self._token_rows))

    def _prefill(self, ids: torch.Tensor, pad: torch.Tensor, adapter: str | None) -> torch.Tensor:
        """Fill the cache with the left-padded prompts `ids` (B, P); return the logits after them."""
        width = ids.shape[1]
        j = torch.arange(width, device=ids.device)
        real = j[None, None, :] >= pad[:, None, None]
        # Causal over the real tokens; a padding position sees itself, so no softmax row is empty (NaN).
        mask = (j[None, :, None] >= j[None, None, :]) & real | torch.eye(width, dtype=torch.bool, device=ids.device)
        pos = (j[None] - pad[:, None]).clamp(min=0)
        step = max(1, PREFILL_TOKENS // width)
        chunks = [slice(a, a + step) for a in range(0, ids.shape[0], step)]
        return torch.cat([self._forward(ids[r], pos[r], j, mask[r, None], r, adapter) for r in chunks])

    def _step(self, adapter: str | None) -> torch.Tensor:
        """One decode step over the static inputs: the token at cache slot `slot` of each row."""
        s = self._statics
        mask = ((s["arange"] >= s["pad"][:, None]) & (s["arange"] <= s["slot"]))[:, None, None]
        return self._forward(s["ids"], (s["slot"] - s["pad"])[:, None], s["slot"], mask, slice(None), adapter)

    def _decoder(self, adapter: str | None):
        """The decode step as a function: a replayed CUDA graph on a GPU (captured on first use), else eager."""
        if not (self.cuda_graph and self.device.type == "cuda"):
            return lambda: self._step(adapter)
        # A graph reads fixed addresses: recapture when a weight was replaced (e.g. a checkpoint was loaded).
        stamp = tuple(p.data_ptr() for p in self.model.parameters())
        if adapter not in self._graphs or self._graphs[adapter][2] != stamp:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up: lazy initialisation (cuBLAS); its K/V write is redone below
                self._step(adapter)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph):
                    logits = self._step(adapter)
            except RuntimeError as e:  # an op that cannot be captured: decode eagerly from now on, say why
                warnings.warn(f"CUDA graph capture failed, decoding eagerly: {e}", stacklevel=2)
                self.cuda_graph, self.graph_error = False, f"{type(e).__name__}: {e}"
                return lambda: self._step(adapter)
            self._graphs[adapter] = (graph, logits, stamp)
        graph, logits, _ = self._graphs[adapter]
        return lambda: (graph.replay(), logits)[1]

    def _prepare(self, rows: int, length: int) -> None:
        """Static inputs and a zeroed KV cache for `rows` × `length` (kept while the shapes stay)."""
        if self._statics is not None and self._statics["shape"] == (rows, length):
            return
        self._statics, self._graphs = None, {}
        dtype = self.inner.model.embed_tokens.weight.dtype
        new = dict(device=self.device, dtype=torch.long)
        self._statics = {
            "shape": (rows, length),
            "ids": torch.zeros(rows, 1, **new),
            "slot": torch.zeros(1, **new),
            "pad": torch.zeros(rows, **new),
            "arange": torch.arange(length, device=self.device),
            # Zeros: an unused slot is masked out, but its V still meets a 0 weight (NaN · 0 is NaN).
            "cache": torch.zeros(
                len(self.layers), 2, rows, self.kv_heads, length, self.head_dim, dtype=dtype, device=self.device
            ),
        }

    def release(self) -> None:
        """Free the merged copy, the KV cache and the graphs (they come back on the next call)."""
        self.merged, self._statics, self._graphs = None, None, {}


class Sampler(LlamaForward):
    """Sample answers from a Llama: a peft `PeftModel` on a 4-bit base (possibly Unsloth-patched), or a plain model.

    Args:
        model: the model. With adapters, each call picks one (`adapter=None`: adapters off, the base model).
        tokenizer: its tokenizer, with the chat template and a padding token that is not a stop token.
        mode: one of `MODES` (module docstring).
        cuda_graph: capture and replay the decode step on a GPU (False: run it eagerly, to compare).
        free_bytes: the GPU memory free for this process, by device index, which `auto` reads (default: the
            driver's `torch.cuda.mem_get_info`; pass a capped reading to behave as a smaller card would).
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        mode: str = "auto",
        cuda_graph: bool = True,
        free_bytes: Callable[[int], int] | None = None,
    ):
        if mode not in MODES:
            raise ValueError(f"mode={mode!r} is not one of {', '.join(MODES)}.")
        self.model, self.tokenizer, self.cuda_graph, self.graph_error = model, tokenizer, cuda_graph, None
        self.inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.config, self.device = self.inner.config, next(model.parameters()).device
        if self.config.model_type != "llama" or self.config.attention_bias or self.config.mlp_bias:
            raise NotImplementedError("The sampler runs Llama models without biases; use transformers' generate.")
        self.stops = stop_token_ids(tokenizer)
        self.layers = self.inner.model.layers
        self.merged: list[dict[str, torch.Tensor]] | None = None
        self.merged_adapter: str | None = None
        self._statics: dict | None = None
        self._graphs: dict = {}
        self._token_rows: dict = {}  # trainable-token indices on the device (`_weight`)
        c = self.config
        self.heads, self.kv_heads = c.num_attention_heads, c.num_key_value_heads
        self.head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        self.inv_freq, self.rope_scale = _rope_frequencies(c, self.head_dim)
        self.inv_freq = self.inv_freq.to(self.device)
        self.free_bytes = free_bytes or (lambda index: torch.cuda.mem_get_info(index)[0])
        self.mode = mode if mode != "auto" else self._pick()

    def _pick(self) -> str:
        """`merged` for a quantized or LoRA model with room for the copy twice over, else `lean`."""
        plain = not hasattr(self.model, "peft_config") and all(
            _quant_state(_lora(m, None)[0]) is None for m in self._projections()
        )
        if plain or self.device.type != "cuda":
            return "lean"
        return "merged" if self.free_bytes(self.device.index or 0) > 2 * self.merged_bytes() else "lean"

    # --- sampling ---------------------------------------------------------------------------------------

    def _batch(self, prompts, new_tokens, sample, temperature, generator, adapter, min_new_tokens, stream):
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
            if stream is not None:  # one answer, shown as it comes: a host sync every step
                stream(int(token[0]))
                if bool(done[0]):
                    break
            if t + 1 == new_tokens or (t % 16 == 15 and t >= min_new_tokens and bool(done.all())):
                break  # otherwise a host sync only every 16 steps
            s["ids"].copy_(token[:, None])
            s["slot"].fill_(width + t)
            decode = decode or self._decoder(adapter)
            logits = decode()
        return tokens[:n].tolist()

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
        stream: Callable[[int], None] | None = None,
    ) -> list[list[int]]:
        """Generated ids (up to `max_new_tokens`, padded after a stop token) for tokenized prompts.

        `seed=None` draws one from torch's global generator (reproducible under `transformers.set_seed`);
        `min_new_tokens` forbids the stop tokens before that many (benchmarks: fixed lengths); `stream`, for one
        prompt, is called with each new token as it is decoded.
        """
        if adapter is not None and adapter not in getattr(self.model, "peft_config", {}):
            raise ValueError(f"No adapter {adapter!r} on the model (None means adapters off).")
        if stream is not None and len(prompt_ids) != 1:
            raise ValueError("stream= shows one answer: pass one prompt.")
        seed = int(torch.randint(2**62, ())) if seed is None else seed
        if self.mode == "merged" and (self.merged is None or self.merged_adapter != adapter):
            self._merge(adapter)
        generator = torch.Generator(self.device).manual_seed(seed)
        rows, prompt_ids = [], [list(p) for p in prompt_ids]
        for start in range(0, len(prompt_ids), batch_size):
            chunk = prompt_ids[start : start + batch_size]
            rows += self._batch(chunk, max_new_tokens, sample, temperature, generator, adapter, min_new_tokens, stream)
        return rows

    def generate(self, prompts: Sequence[list[dict]], max_new_tokens: int, sample: bool, **options) -> Generations:
        """Answers to chat `prompts` (rendered with the chat template); `options` as `generate_ids` takes them."""
        rows = self.generate_ids([render_prompt(self.tokenizer, p) for p in prompts], max_new_tokens, sample, **options)
        return decode(self.tokenizer, rows)
