"""What every run must show, in one place: invariants (any profile) and the profile's `Expectations`.

Notebooks assert these after each stage, the tests call them, and `benchmarks/smoke_seeds.py` counts them over
many seeds. Each function returns the list of failures (empty when all hold); `require` raises on any.
"""

from __future__ import annotations

from helpers.config import Profile


def sft_failures(profile: Profile, sft: dict) -> list[str]:
    """The SFT loss fell (to at most `sft_loss_ratio_max` × its first value when the profile promises that)."""
    failures = []
    if not sft["loss_last"] < sft["loss_first"]:
        failures.append(f"SFT loss did not fall: {sft['loss_first']:.3f} → {sft['loss_last']:.3f}")
    e = profile.expect
    if e and sft["loss_last"] > e.sft_loss_ratio_max * sft["loss_first"]:
        failures.append(
            f"SFT loss {sft['loss_first']:.3f} → {sft['loss_last']:.3f}: not below {e.sft_loss_ratio_max} × the first"
        )
    return failures


def dpo_failures(profile: Profile, dpo: dict) -> list[str]:
    """Step-0 rewards exactly 0 (the reference is the SFT model), and the held-out reward accuracy."""
    failures = []
    if dpo["step0_reward_abs_max"] != 0.0:
        failures.append(f"step-0 implicit rewards are not exactly 0 (max |r| = {dpo['step0_reward_abs_max']:g})")
    e = profile.expect
    if e and dpo["reward_accuracy_after"] < e.dpo_reward_accuracy_min:
        failures.append(
            f"DPO held-out reward accuracy {dpo['reward_accuracy_after']:.3f} < {e.dpo_reward_accuracy_min}"
        )
    return failures


def eval_failures(profile: Profile, evaluation: dict) -> list[str]:
    """With a code judge: base < SFT, SFT and DPO above their minima, DPO ahead of SFT by the promised gain."""
    e = profile.expect
    if e is None or "better_answer_rate" not in evaluation.get("dpo", {}):
        return []
    rate = {m: evaluation[m]["better_answer_rate"] for m in ("base", "sft", "dpo")}
    failures = []
    if not rate["base"] < rate["sft"]:
        failures.append(f"better-answer rate: base {rate['base']:.3f} is not below SFT {rate['sft']:.3f}")
    if rate["sft"] < e.better_answer_rate_sft_min:
        failures.append(f"better-answer rate: SFT {rate['sft']:.3f} < {e.better_answer_rate_sft_min}")
    if rate["dpo"] < e.better_answer_rate_dpo_min:
        failures.append(f"better-answer rate: DPO {rate['dpo']:.3f} < {e.better_answer_rate_dpo_min}")
    if rate["dpo"] < rate["sft"] + e.dpo_gain_over_sft_min:
        failures.append(
            f"better-answer rate: DPO {rate['dpo']:.3f} < SFT {rate['sft']:.3f} + {e.dpo_gain_over_sft_min}"
        )
    return failures


def reward_model_failures(profile: Profile, evaluation: dict) -> list[str]:
    """The judge is better than chance, and as good as the profile promises (nothing: random weights)."""
    if profile.random_weights:
        return []
    accuracy = evaluation["reward_model"]["accuracy"]
    minimum = profile.expect.reward_model_accuracy_min if profile.expect else 0.5
    return [] if accuracy >= minimum else [f"reward-model accuracy on held-out pairs {accuracy:.3f} < {minimum}"]


def rl_failures(profile: Profile, rlhf: dict) -> list[str]:
    """What the RL stage must show (empty when all hold): the reference is the start model (KL exactly 0 at step
    0); RL raised the reward model's held-out score; with a code judge, RL did not lower the better-answer rate;
    and the hacking run raised its proxy while the truth got worse: the code judge's rate fell, or without a code
    judge, the score of the reward model it did not optimise. With `profile.random_weights` only the first holds."""
    found = []
    if rlhf["step0_kl_nats"] != 0.0:
        found.append(f"the KL to the reference is {rlhf['step0_kl_nats']:g} before training, not exactly 0")
    if profile.random_weights:
        return found
    proxy = rlhf["proxy_reward"]
    if not proxy["rl"] > proxy["sft"]:
        found.append(f"RL did not raise the reward model's held-out score: {proxy['sft']:.3f} → {proxy['rl']:.3f}")
    rate = rlhf["better_answer_rate"] if profile.code_judge else None
    if rate and rate["rl"] < rate["sft"]:
        found.append(f"RL lowered the better-answer rate: {rate['sft']:.3f} → {rate['rl']:.3f}")
    hacking = rlhf.get("hacking")
    if hacking:
        hacked = hacking["proxy_reward"]
        if not hacked["rl"] > hacked["sft"]:
            found.append(f"the hacking run did not raise its proxy: {hacked['sft']:.3f} → {hacked['rl']:.3f}")
        key = "better_answer_rate" if profile.code_judge else "reward_model_score"
        truth = hacking[key]
        if not truth["rl"] < truth["sft"]:
            found.append(f"the hacking run did not lower the {key}: {truth['sft']:.3f} → {truth['rl']:.3f}")
    return found


def split_failures(overlap: dict) -> list[str]:
    """Nothing held out was trained on (`helpers.splits.overlap_report`)."""
    return [f"{k} = {v} (must be 0)" for k, v in overlap.items() if k != "eval_pairs" and v != 0]


def require(failures: list[str]) -> None:
    """Raise AssertionError listing `failures`, if any."""
    if failures:
        raise AssertionError("; ".join(failures))
