"""Pictures for notebooks 01 and 06: the SFT, RLHF and DPO pipelines and RLOO's loop as box-and-arrow diagrams, and
DPO's loss curve.

Each function returns a matplotlib Figure (closed to pyplot, so a notebook shows it once and tests can read
it) and writes a file only when given a path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from matplotlib.figure import Figure
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch, Patch

from helpers.theory import dpo_loss

__all__ = ["draw_dpo_pipeline", "draw_rlhf_pipeline", "draw_rloo_loop", "draw_sft_pipeline", "plot_dpo_loss_vs_margin"]

# Fill colour per kind of box; the legend names them.
COLORS = {
    "data": "#fff2cc",
    "model": "#dae8fc",
    "frozen": "#e6e6e6",
    "training": "#d5e8d4",
}
LEGEND = {"data": "data", "model": "model", "frozen": "frozen model", "training": "training step"}
BOX_W, BOX_H = 2.9, 1.0


@dataclass(frozen=True)
class Box:
    x: float  # centre, in data units
    y: float
    label: str
    kind: str


@dataclass(frozen=True)
class Arrow:
    src: str
    dst: str
    label: str = ""
    offset: float = 0.0  # vertical shift, to draw two arrows between the same boxes
    dashed: bool = False


def _draw(boxes: dict[str, Box], arrows: list[Arrow], title: str, size: tuple[float, float]) -> Figure:
    """Draw `boxes` joined by `arrows` on a canvas `size` data units wide and high (one unit per inch)."""
    fig, ax = plt.subplots(figsize=size)
    ax.set_xlim(0, size[0])
    ax.set_ylim(0, size[1])
    ax.axis("off")
    patches = {}
    for key, box in boxes.items():
        patch = FancyBboxPatch(
            (box.x - BOX_W / 2, box.y - BOX_H / 2),
            BOX_W,
            BOX_H,
            boxstyle="round,pad=0.02,rounding_size=0.12",
            facecolor=COLORS[box.kind],
            edgecolor="#444444",
        )
        ax.add_patch(patch)
        patches[key] = patch
        ax.text(box.x, box.y, box.label, ha="center", va="center", fontsize=10)
    for arrow in arrows:
        a, b = boxes[arrow.src], boxes[arrow.dst]
        start, end = (a.x, a.y + arrow.offset), (b.x, b.y + arrow.offset)
        ax.add_patch(
            FancyArrowPatch(
                start,
                end,
                patchA=patches[arrow.src],
                patchB=patches[arrow.dst],
                arrowstyle="-|>",
                mutation_scale=14,
                linestyle="--" if arrow.dashed else "-",
                color="#333333",
            )
        )
        if arrow.label:
            mid = ((start[0] + end[0]) / 2, (start[1] + end[1]) / 2)
            ax.text(
                *mid,
                arrow.label,
                ha="center",
                va="center",
                fontsize=9,
                style="italic",
                bbox={"facecolor": "white", "edgecolor": "none", "pad": 1.5},
            )
    kinds = dict.fromkeys(box.kind for box in boxes.values())
    handles = [Patch(facecolor=COLORS[k], edgecolor="#444444", label=LEGEND[k]) for k in kinds]
    ax.legend(
        handles=handles,
        loc="lower right",
        bbox_to_anchor=(1.0, 1.0),
        fontsize=8,
        frameon=False,
        ncol=len(handles),
    )
    ax.set_title(title, fontsize=12, loc="left")
    plt.close(fig)
    return fig


def _save(fig: Figure, path: str | Path | None) -> Figure:
    if path is not None:
        fig.savefig(path, dpi=120, bbox_inches="tight")
    return fig


def draw_sft_pipeline(path: str | Path | None = None) -> Figure:
    """SFT: demonstrations train the base model with cross-entropy on the assistant tokens."""
    boxes = {
        "data": Box(6.5, 3.6, "Demonstrations\n(prompt $x$, response $y$)", "data"),
        "base": Box(2.0, 1.6, "Base model\n$\\pi_{\\mathrm{base}}$", "model"),
        "sft": Box(
            6.5,
            1.6,
            "SFT: minimise\n$-\\sum_t \\log \\pi_\\theta(y_t \\mid x, y_{<t})$\non assistant tokens",
            "training",
        ),
        "out": Box(11.0, 1.6, "SFT model\n$\\pi_{\\mathrm{SFT}}$", "model"),
    }
    arrows = [Arrow("base", "sft", "init $\\theta$"), Arrow("data", "sft"), Arrow("sft", "out")]
    return _save(_draw(boxes, arrows, "SFT: imitate good answers", (13.0, 4.6)), path)


def draw_rlhf_pipeline(path: str | Path | None = None) -> Figure:
    """RLHF: fit a reward model on preference pairs, then PPO on sampled answers, KL-tied to the reference.

    Four models take part in PPO: the policy, the frozen reference, the reward model and the value model (the
    critic that estimates how much reward is still to come after each token, for PPO's advantages).
    """
    boxes = {
        "pairs": Box(2.0, 5.0, "Preference pairs\n$(x, y_w, y_l)$", "data"),
        "rm": Box(6.5, 5.0, "Reward model $r_\\phi$\nfit with Bradley-Terry", "model"),
        "value": Box(11.0, 5.0, "Value model $V_\\psi$ (critic)\ntrained with the policy", "model"),
        "sft": Box(2.0, 2.9, "SFT model\n$\\pi_{\\mathrm{SFT}}$", "model"),
        "policy": Box(6.5, 2.9, "Policy $\\pi_\\theta$\nsamples $y$ for prompt $x$", "model"),
        "ppo": Box(11.0, 2.9, "PPO: maximise\n$r_\\phi(x, y) - \\beta\\,\\mathrm{KL}$", "training"),
        "ref": Box(6.5, 0.9, "Reference $\\pi_{\\mathrm{ref}}$\n(frozen copy of $\\pi_{\\mathrm{SFT}}$)", "frozen"),
    }
    arrows = [
        Arrow("pairs", "rm", "step 1"),
        Arrow("sft", "policy", "init"),
        Arrow("sft", "ref", "copy"),
        Arrow("policy", "ppo", "sample $y$", offset=0.25),
        Arrow("ppo", "policy", "update $\\theta$", offset=-0.25, dashed=True),
        Arrow("rm", "ppo", "reward $r_\\phi(x, y)$"),
        Arrow("value", "ppo", "advantages"),
        Arrow("ref", "ppo", "$\\log \\pi_{\\mathrm{ref}}(y|x)$"),
    ]
    title = "RLHF: reward model, then PPO with a KL leash (four models in memory)"
    return _save(_draw(boxes, arrows, title, (13.0, 6.0)), path)


def draw_dpo_pipeline(path: str | Path | None = None) -> Figure:
    """DPO: one classification-style loss on preference pairs, the policy measured against a reference."""
    boxes = {
        "pairs": Box(11.0, 4.6, "Preference pairs\n$(x, y_w, y_l)$", "data"),
        "sft": Box(2.0, 2.5, "SFT model\n$\\pi_{\\mathrm{SFT}}$", "model"),
        "policy": Box(6.5, 4.0, "Policy $\\pi_\\theta$\n(trained by the loss)", "model"),
        "ref": Box(6.5, 1.0, "Reference $\\pi_{\\mathrm{ref}}$\n(frozen copy of $\\pi_{\\mathrm{SFT}}$)", "frozen"),
        "loss": Box(11.0, 2.5, "DPO loss $-\\log\\sigma(\\beta\\, m)$\n$m$: log-ratio margin", "training"),
    }
    arrows = [
        Arrow("sft", "policy", "init"),
        Arrow("sft", "ref", "copy"),
        Arrow("pairs", "loss"),
        Arrow("policy", "loss", "$\\log \\pi_\\theta(y|x)$"),
        Arrow("ref", "loss", "$\\log \\pi_{\\mathrm{ref}}(y|x)$"),
    ]
    return _save(_draw(boxes, arrows, "DPO: no reward model, no sampling", (13.0, 5.4)), path)


def draw_rloo_loop(path: str | Path | None = None) -> Figure:
    """RLHF with RLOO: the policy samples k answers, the reward model scores them, the KL to the frozen reference
    is subtracted, the other answers' mean is the baseline, and the advantage updates the policy."""
    advantage = "$A_i = R_i - \\mathrm{mean}_{j \\ne i}\\, R_j$"
    boxes = {
        "prompts": Box(2.0, 4.9, "Prompts $x$\n(training problems)", "data"),
        "policy": Box(6.5, 4.9, "Policy $\\pi_\\theta$ samples\n$y_1, \\dots, y_k$ for each $x$", "model"),
        "rm": Box(11.0, 4.9, "Reward model\n$r_\\phi(x, y_i)$", "frozen"),
        "ref": Box(6.5, 2.8, "Reference $\\pi_{\\mathrm{ref}}$\n(frozen copy of the start)", "frozen"),
        "reward": Box(11.0, 2.8, "$R_i = r_\\phi(x, y_i) - \\beta\\,\\mathrm{KL}_i$", "training"),
        "update": Box(2.0, 0.8, f"{advantage}\nraise $\\log \\pi_\\theta(y_i|x)$\nin proportion to $A_i$", "training"),
    }  # fmt: skip
    arrows = [
        Arrow("prompts", "policy"),
        Arrow("policy", "rm", "answers $y_i$"),
        Arrow("policy", "ref", "$y_i$"),
        Arrow("rm", "reward", "score"),
        Arrow("ref", "reward", "$\\mathrm{KL}_i$"),
        Arrow("reward", "update", "baseline: the\nother answers"),
        Arrow("update", "policy", "update $\\theta$", dashed=True),
    ]
    return _save(_draw(boxes, arrows, "RLHF with RLOO: no value model", (13.0, 5.8)), path)


def plot_dpo_loss_vs_margin(
    betas: tuple[float, ...] | list[float], max_margin: float = 30.0, path: str | Path | None = None
) -> Figure:
    """DPO loss, and how hard its gradient pushes, against the log-ratio margin m, one curve per β.

    m = log π_θ(y_w|x)/π_ref(y_w|x) − log π_θ(y_l|x)/π_ref(y_l|x) (nats, unscaled); the loss is `dpo_loss` on it and
    the push is its derivative −d loss/dm = β σ(−β m), taken by autograd. The loss axis stops at 3 × log 2: training
    starts at log 2 (m = 0) and should go down from there; the steep rise for m < 0 would only squash that region.

    Args:
        betas: the β values to draw.
        max_margin: the margin axis runs from −max_margin to +max_margin.
        path: where to save the figure, if anywhere.

    Returns:
        The figure: loss on the left, push on the right.
    """
    fig, (ax_loss, ax_push) = plt.subplots(1, 2, figsize=(12.0, 4.2))
    for beta in betas:
        margins = torch.linspace(-max_margin, max_margin, 401, dtype=torch.float64, requires_grad=True)
        zeros = torch.zeros_like(margins)
        # A pair whose rejected log-ratio is 0 and whose chosen log-ratio is the margin.
        losses, _, _ = dpo_loss(margins, zeros, zeros, zeros, beta)
        (push,) = torch.autograd.grad(-losses.sum(), margins)
        x = margins.detach()
        ax_loss.plot(x, losses.detach(), label=f"$\\beta$ = {beta:g}")
        ax_push.plot(x, push, label=f"$\\beta$ = {beta:g}")
    ax_loss.axhline(math.log(2), color="grey", linestyle=":", linewidth=1)
    ax_loss.annotate("log 2 at m = 0", (0, math.log(2)), xytext=(6, 1.1), fontsize=9, arrowprops={"arrowstyle": "->"})
    ax_loss.set(ylabel="DPO loss", ylim=(0, 3 * math.log(2)))
    ax_loss.set_title("Loss: larger $\\beta$, steeper and sooner flat", fontsize=11)
    ax_push.set(ylabel="push on the margin, $\\beta\\,\\sigma(-\\beta\\, m)$", ylim=(0, 1.05 * max(betas)))
    ax_push.set_title("Gradient: fades once $m$ exceeds a few $1/\\beta$", fontsize=11)
    for ax in (ax_loss, ax_push):
        ax.set_xlabel("log-ratio margin $m$ = chosen log-ratio $-$ rejected log-ratio (nats)")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    plt.close(fig)
    return _save(fig, path)
