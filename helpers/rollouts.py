"""Rollouts of TRL's online trainers (`RLOOTrainer`, `GRPOTrainer`) sampled by `helpers.sampling.Sampler`: a mixin
that replaces the one method turning tokenized prompts into completions, and leaves the rest of TRL's loop as is.
"""

from __future__ import annotations

import inspect

from helpers.sampling import Sampler

__all__ = ["FastSamplingMixin"]


class FastSamplingMixin:
    """Mix into TRL's `RLOOTrainer` or `GRPOTrainer` (first): rollouts come from a `Sampler`.

        class FastRLOOTrainer(FastSamplingMixin, RLOOTrainer): ...
        trainer = FastRLOOTrainer(model=peft_model, ..., sampling_mode="auto")

    `_generate_single_turn(prompt_ids, ...)` is the one method that turns tokenized prompts into completion ids
    (RLOO returns them; GRPO also per-token log-probs, None off vLLM); the chat template, decoding, rewards, masks
    and logs around it stay TRL's. The adapter changes only at optimizer steps, so the sampler is refreshed when
    `state.global_step` moved since the last rollout (as TRL syncs its vLLM weights). Settings the sampler does
    not implement (top-p, top-k, min-p, repetition penalty, `generation_kwargs`, images, TRL's own vLLM or
    continuous batching) go through TRL's path. `<|eot_id|>` and `<|end_of_text|>` count as TRL's EOS tokens.
    """

    def __init__(self, *args, sampling_mode: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        self.sampler = Sampler(self.model, self.processing_class, mode=sampling_mode)
        self.eos_token_ids = list(dict.fromkeys([*self.eos_token_ids, *self.sampler.stops]))
        self._rollout_step = None

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, *args, **kwargs):
        parent = super()._generate_single_turn
        plain = not (
            images is not None
            or multimodal_fields
            or self.use_vllm
            or getattr(self, "use_transformers_continuous_batching", False)
            or self.top_p not in (None, 1.0)
            or self.top_k
            or self.min_p
            or self.repetition_penalty not in (None, 1.0)
            or self.args.generation_kwargs
        )
        if not plain:
            return parent(prompt_ids, images, multimodal_fields, *args, **kwargs)
        if self._rollout_step != self.state.global_step:  # an optimizer step changed the adapter
            self.sampler.refresh()
            self._rollout_step = self.state.global_step
        completions = self.sampler.generate_ids(
            prompt_ids,
            self.max_completion_length,
            sample=True,
            temperature=self.temperature,
            seed=None,
            batch_size=len(prompt_ids),
            adapter=self.model.active_adapter,
        )
        return (completions, None) if "num_generations" in inspect.signature(parent).parameters else completions
