"""The Llama forward `helpers.sampling.Sampler` decodes with: transformers' Llama, op for op, over a static KV cache.

The weights are read from a peft `PeftModel` on a 4-bit (bitsandbytes) or plain base: in `merged` mode from a bf16
copy of every projection with the adapter's LoRA merged in (W + s·B·A, kept in step by `refresh`), in `lean` mode
from the 4-bit base plus the LoRA product at each call. The prompt is prefilled eagerly, in chunks; a decode step
(one token per row) runs over fixed shapes and is captured once as a CUDA graph and replayed on a GPU.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["LlamaForward", "dequantize"]

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
        raise NotImplementedError("DoRA and LoRA biases are not supported: use mode='generate'.")
    return base, module.lora_A[adapter].weight, module.lora_B[adapter].weight, module.scaling[adapter]


def _saved(module: Any, adapter: str | None) -> Any:
    """The copy of a peft `modules_to_save` module (embeddings, head) that `adapter` uses, else the module."""
    copies = getattr(module, "modules_to_save", None)
    if copies is None:
        return module
    return copies[adapter] if adapter is not None and adapter in copies else module.original_module


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
    """The weights and the forward of `helpers.sampling.Sampler`, its base: `Sampler.__init__` sets what these
    methods read (the model and its layers, device, mode, attention shapes, RoPE frequencies, the merged copy,
    the static inputs and the captured graphs)."""

    def merged_bytes(self) -> int:
        """Size of the merged copy: every projection of every layer in the compute dtype."""
        projections = [getattr(getattr(layer, o), n) for layer in self.layers for o, ns in GROUPS.values() for n in ns]
        return sum(_lora(m, None)[0].in_features * _lora(m, None)[0].out_features * 2 for m in projections)

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
        x = F.embedding(ids, _saved(self.inner.model.embed_tokens, adapter).weight)
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
        return F.linear(x, _saved(self.inner.lm_head, adapter).weight)

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
