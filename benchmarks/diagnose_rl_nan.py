"""Where does the NaN gradient of notebook 06's first RL step on the 8B shapes come from (H100, capped, 2026-12-07:
`results/h100-06-nan.json`)? One RL step per variant, each on a freshly built stage, printing the advantages, the
completion lengths, the loss, which parameters got a non-finite gradient and the peak memory:

    # on the GPU, with the environment `bash benchmarks/gpu.sh world` sets up (see the gpu3 call in the closing note)
    python3 benchmarks/diagnose_rl_nan.py torchlogprobs nofused trlgen default

Variants: `default`; `torchlogprobs` (TRL's Triton log-prob kernel replaced by plain torch on CUDA too);
`nofused` (`UNSLOTH_FUSED_LINEAR=0`: Unsloth's fused RLOO log-probs off); `trlgen` (TRL's `generate` for the rollouts
instead of the sampler). Not run yet: no machine could be started.
"""

import os
import sys
import time
from dataclasses import replace

import torch

from helpers import machine, rl, settings, training

profile = settings.load_profile()
profile = replace(
    profile,
    rl=replace(profile.rl, max_steps=1, eval_steps=10_000, logging_steps=1, save_steps=10_000),
    report_to_wandb=False,
)
machine.prepare(profile)
training.ensure(profile, profile.rl.start_from)
rm, rtok = rl.load_reward_model(profile)
print("rl settings", profile.rl, flush=True)


def attempt(label, env=None, trl_generate=False, torch_logprobs=False):
    os.environ.update(env or {})
    from helpers import fixes

    fixes.install_cpu_logprob_fallback()
    saved = fixes.TorchLogProbs.kernel
    if torch_logprobs:
        fixes.TorchLogProbs.kernel = None  # plain torch on the GPU too
    t0 = time.time()
    stage = rl.build(profile, rm, rtok)
    t = stage.trainer
    if trl_generate:
        parent = type(t).__mro__[1]._generate_single_turn
        t._generate_single_turn = lambda *a, **k: parent(t, *a, **k)
    bad = []
    for n, p in t.model.named_parameters():
        if p.requires_grad:
            p.register_hook(lambda g, n=n: bad.append(n) if not torch.isfinite(g).all() and len(bad) < 6 else None)
    orig = t._compute_loss

    def wrapped(model, inputs):
        for k in ("advantages", "old_logps"):
            v = inputs.get(k)
            if v is not None:
                v = v.float()
                print(label, k, [round(x, 3) for x in v.tolist()][:16], "finite", torch.isfinite(v).all().item())
        print(label, "completion tokens", inputs["completion_mask"].sum(1).tolist()[:16], flush=True)
        loss = orig(model, inputs)
        print(label, "loss", loss.item(), flush=True)
        return loss

    t._compute_loss = wrapped
    try:
        training.train_and_save(stage, resume=False)
        print(label, "OK", flush=True)
    except Exception as e:  # noqa: BLE001
        print(label, "FAILED", type(e).__name__, str(e)[:200], flush=True)
    print(
        label,
        "logprob paths",
        t.__dict__.get("_unsloth_rloo_fused_fallbacks"),
        t.__dict__.get("_unsloth_rloo_fused_calls"),
        "trl kernel",
        saved,
        flush=True,
    )
    fixes.TorchLogProbs.kernel = saved
    os.environ.pop("UNSLOTH_FUSED_LINEAR", None)
    print(label, "nan grads in", bad, "metrics", {k: v[-1:] for k, v in t._metrics["train"].items()}, flush=True)
    print(label, f"{time.time() - t0:.0f} s, peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB", flush=True)
    del stage
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


for spec in sys.argv[1:]:
    if spec == "default":
        attempt("default")
    elif spec == "nofused":
        attempt("nofused", env={"UNSLOTH_FUSED_LINEAR": "0"})
    elif spec == "torchlogprobs":
        attempt("torchlogprobs", torch_logprobs=True)
    elif spec == "trlgen":
        attempt("trlgen", trl_generate=True)
