"""Tables and plots for benchmarks/efficacy.py: efficacy.md, efficacy.png, efficacy_gates.png, efficacy_budget.png."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np

from se_inject.io.atomic import atomic_write

__all__ = ["render_markdown", "write_plots", "ARM_TEXT", "STATIC"]

#: Below this mean standard deviation across images, a block's gates are a fixed per-channel scale.
STATIC = 0.005

ARM_TEXT = {
    "plain": "whole backbone + new head, no SE",
    "se": "`inject_se` defaults (identity start), `param_groups` SE group",
    "se_naive": "paper's sigmoid, ordinary init (`identity_init=False`)",
    "se_adapter": "`freeze_except_se(norms=False)`: SE blocks + head, BatchNorm frozen",
    "head_only": "linear probe on the frozen backbone (floor)",
    "bn_tune": "BatchNorm affine + head, BatchNorm statistics frozen (BitFit's convolutional cousin)",
    "se_bn": "`freeze_except_se(norms=True)`: SE blocks + BatchNorm affine + head, statistics frozen",
    "lora_r<k>": "peft LoRA of rank k (alpha = k) on every backbone Conv2d + head, BatchNorm frozen",
}


def _pm(mean: float, std: float, digits: int = 4) -> str:
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _p(value: float | None) -> str:
    if value is None:
        return "n/a"
    return "<0.001" if value < 0.001 else f"{value:.3f}"


def _diff(paired: dict[str, Any]) -> str:
    return f"{paired['mean']:+.4f} ± {paired['std']:.4f}"


def _arm_table(setting: dict[str, Any]) -> list[str]:
    lines = [
        "| arm | trained params | lr (SE lr) | rates searched | step-0 acc | test acc, mean ± std | diff to plain, mean ± std | wins / losses / ties | sign test p | paired t p |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    edge = limit = False
    for arm, e in setting["arms"].items():
        grid = e.get("grid", setting["protocol"]["lr_grid"])
        lr = f"{e['lr']:g}" + (f" ({e['se_lr']:g})" if e.get("se_lr") is not None else "")
        if e.get("lr_at_limit"):
            lr, limit = lr + " ‡", True
        elif e["lr"] in (min(grid), max(grid)):
            lr, edge = lr + " †", True
        searched = ", ".join(f"{g:g}" for g in sorted(grid))
        params = f"{e['trainable_params']:,}" if "trainable_params" in e else "-"
        step0 = f"{np.mean(e['step0_acc']):.4f}"
        if "step0_logits_equal_plain" in e:
            step0 += " (= plain: " + ("yes" if all(e["step0_logits_equal_plain"]) else "NO") + ")"
        paired = e.get("paired_vs_plain")
        if paired is None:
            diff = wlt = sign = t = "-"
        else:
            diff = _diff(paired)
            wlt = f"{paired['wins']} / {paired['losses']} / {paired['ties']}"
            sign, t = _p(paired["sign_p"]), _p(paired["t_p"])
        lines.append(f"| `{arm}` | {params} | {lr} | {searched} | {step0} | {_pm(e['mean'], e['std'])} | {diff} | {wlt} | "
                     f"{sign} | {t} |")
    if edge:
        lines += ["", "† at the edge of the grid: a rate beyond it might have done better for that arm."]
    if limit:
        lines += ["", "‡ at the stated limit of the search: the best rate was at the grid's edge, the next step past the limit."]
    return lines


def _pairs_table(pairs: dict[str, dict[str, Any]]) -> list[str]:
    lines = ["| comparison (paired per seed) | per-seed differences | mean ± std | wins / losses / ties | sign test p | paired t p |",
             "|---|---|---:|---:|---:|---:|"]
    for name, d in pairs.items():
        per_seed = ", ".join(f"{x:+.4f}" for x in d["diffs"])
        lines.append(f"| `{name}` | {per_seed} | {_diff(d)} | {d['wins']} / {d['losses']} / {d['ties']} | "
                     f"{_p(d['sign_p'])} | {_p(d['t_p'])} |")
    return lines


def _scratch_section(scratch: dict[str, Any]) -> list[str]:
    p = scratch["protocol"]
    lines = [
        "## From scratch: the paper's own setting",
        "",
        f"- Model: {p['model']}; data: {p['data']}.",
        f"- {p['steps']} steps of {p['batch']} images, {p['optimizer']}. Seeds {p['seeds']}: a seed fixes the "
        "subset, the backbone initialisation (the same in every arm), the SE layers' init and the batches.",
        "- Arms: `plain` (no SE), `se` (`inject_se` defaults: identity start, 2·sigmoid gate, last layer at 0), "
        "`se_paper` (`identity_init=False`, the CLI's `--paper-init`: sigmoid gate, ordinary init).",
        "",
        "| arm | test acc, mean ± std | per seed | half-way acc | final train loss | diff to plain | w / l / t | sign p | t p |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for arm, e in scratch["arms"].items():
        d = e.get("paired_vs_plain")
        tail = "- | - | - | -" if d is None else (
            f"{_diff(d)} | {d['wins']} / {d['losses']} / {d['ties']} | {_p(d['sign_p'])} | {_p(d['t_p'])}")
        lines.append(
            f"| `{arm}` | {_pm(e['mean'], e['std'])} | {', '.join(f'{a:.4f}' for a in e['final_acc'])} | "
            f"{np.mean(e['half_acc']):.4f} | {np.mean(e['final_train_loss']):.3f} | {tail} |")
    if "se" in scratch["arms"] and "step0_logits_equal_plain" in scratch["arms"]["se"]:
        same = all(scratch["arms"]["se"]["step0_logits_equal_plain"])
        lines += ["", f"At step 0, `se`'s test logits equal `plain`'s (`torch.equal`, every seed): {'yes' if same else 'NO'}."]
    if scratch.get("pairs"):
        lines += ["", *_pairs_table(scratch["pairs"])]
    return lines + [""]


def _stage_table(stages: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| stage | blocks | gate mean | spread (std) | range | std across images | std across class means | within 0.02 of 1 | saturated | SE params | SE MACs | at 1? |",
        "|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for s in stages:
        cls = "-" if s["class_std"] is None else f"{s['class_std']:.4f}"
        lines.append(
            f"| {s['stage']} | {len(s['blocks'])} | {s['mean']:.3f} | {s['std']:.3f} | {s['min']:.2f} to {s['max']:.2f} | "
            f"{s['image_std']:.4f} | {cls} | {100 * s['near_one']:.0f}% | {100 * s['saturated']:.0f}% | "
            f"{s['se_params']:,} | {s['se_fc_macs']:,} | {'yes' if s['at_one'] else 'no'} |"
        )
    return lines


def _gate_arm_table(setting: dict[str, Any]) -> list[str]:
    lines = [
        "| arm | gate mean | spread (std) | std across images | saturated | within 0.02 of 1 |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for arm, per_seed in setting.get("gates", {}).items():
        blocks = [b for seed in per_seed for b in seed]
        lines.append(
            f"| `{arm}` | {np.mean([b['mean'] for b in blocks]):.3f} | {np.mean([b['std'] for b in blocks]):.3f} | "
            f"{np.mean([b['image_std'] for b in blocks]):.4f} | {100 * np.mean([b['saturated'] for b in blocks]):.0f}% | "
            f"{100 * np.mean([b['near_one'] for b in blocks]):.0f}% |"
        )
    return lines


def _study_table(study: dict[str, Any]) -> list[str]:
    lines = [
        "| recipe | arm | optimizer | lr (SE lr) | frozen-backbone warm-up | test acc, mean ± std | paired with | diff, mean ± std | w / l / t | sign p | t p | gates: mean, saturated, at 1 (last stage) |",
        "|---|---|---|---|---:|---:|---|---:|---:|---:|---:|---|",
    ]
    for name, e in study.items():
        lr = f"{e['lr']:g}" + (f" ({e['se_lr']:g})" if e.get("se_lr") is not None else "")
        d = e["paired"]
        gates = "-"
        if e.get("stages"):
            last = e["stages"][-1]
            gates = f"{last['mean']:.2f}, {100 * last['saturated']:.0f}%, {100 * last['near_one']:.0f}%"
        lines.append(
            f"| {name} | `{e['arm']}` | {e['optimizer']} | {lr} | {e['warmup_steps']} steps | {_pm(e['mean'], e['std'])} | "
            f"{e['versus']} | {_diff(d)} | {d['wins']} / {d['losses']} / {d['ties']} | "
            f"{_p(d['sign_p'])} | {_p(d['t_p'])} | {gates} |"
        )
    return lines


def _dead_stages(stages: list[dict[str, Any]]) -> str:
    """One sentence: which stages keep their gates at 1, and what leaving their SE blocks out saves."""
    dead = [s for s in stages if s["at_one"]]
    total = sum(s["se_params"] for s in stages)
    static = [s for s in stages if not s["at_one"] and s["image_std"] < STATIC]
    note = ""
    if static:
        note = (
            f" Stage(s) {', '.join(str(s['stage']) for s in static)}: gates moved but hardly differ between images "
            f"(mean std across images < {STATIC}), so there the block is a fixed per-channel scale of the branch, not "
            f"attention; a scale the branch's last BatchNorm could hold. Their SE blocks cost "
            f"{sum(s['se_params'] for s in static):,} parameters and {sum(s['se_fc_macs'] for s in static):,} MACs "
            f"+ {sum(s['se_elementwise_ops'] for s in static):,} element-wise operations per image."
        )
    if not dead:
        closest = max(stages, key=lambda s: s["near_one"])
        return (
            f"No stage keeps every gate within 0.02 of 1 in every seed (the closest: stage {closest['stage']}, "
            f"{100 * closest['near_one']:.0f}% of its gates)." + note
        )
    live = [s["stage"] for s in stages if not s["at_one"]]
    saved = sum(s["se_params"] for s in dead)
    return (
        f"Stages {', '.join(str(s['stage']) for s in dead)} keep every gate within 0.02 of 1 in every seed: their SE "
        f"blocks are dead weight here. `inject_se(model, stages={live})` leaves them out (or `remove_se` and "
        f"re-inject), which saves {saved:,} of the {total:,} SE parameters, "
        f"{sum(s['se_fc_macs'] for s in dead):,} MACs and {sum(s['se_elementwise_ops'] for s in dead):,} "
        f"element-wise operations per image." + note
    )


def _summary(result: dict[str, Any]) -> list[str]:
    """`se` against `plain` in every setting, in one line each, with the learning rates when they differ."""
    lines = ["Summary, `se` (identity start) against `plain`, paired over the seeds:", ""]
    for setting in result["settings"]:
        arms, sp = setting["arms"], setting["protocol"]
        if "se" not in arms or "plain" not in arms:
            continue
        d = arms["se"]["paired_vs_plain"]
        line = (
            f"- {sp['target']}, {sp['budget_per_class']} per class{' (round 1)' if setting.get('round') == 1 else ''}: {_diff(d)} "
            f"({d['wins']} better / {d['losses']} worse / {d['ties']} tied, paired t p = {_p(d['t_p'])})"
        )
        if arms["se"]["lr"] != arms["plain"]["lr"]:
            line += (
                f"; the two arms chose different learning rates on validation (plain {arms['plain']['lr']:g}, "
                f"se {arms['se']['lr']:g}), so this difference mixes SE with the learning rate"
            )
        lines.append(line + ".")
    return lines + [""]


def render_markdown(result: dict[str, Any], plots: list[str], quick: bool) -> str:
    """The report: protocol, one table per setting, gate statistics per stage, plots."""
    p = result["protocol"]
    if not result.get("settings"):  # --part scratch alone
        return "\n".join(["# Does SE help? From-scratch experiment", "", *_scratch_section(result["scratch"])]) + "\n"
    lines = [
        "# Does retrofitting SE help? Transfer experiment" + (" (--quick: CI smoke run, not a result)" if quick else ""),
        "",
        "Written by `benchmarks/efficacy.py`" + (" --quick" if quick else "") + "; raw numbers in `efficacy.json`.",
        "",
        f"- Backbone: {p['backbone']}, pretrained here on {p['source']} "
        f"(source test accuracy {p['pretrain_source_test_acc']:.4f}).",
        f"- Fine-tuning: {p['steps']} steps of {p['batch']} images, {p['optimizer']} (weight decay {p['weight_decay']}), "
        f"{p['schedule']}. Learning rate per arm by {p['lr_selection']}; "
        f"SE learning rate = {p['se_lr_multiplier']:g} x the base learning rate. Frozen-backbone arms keep "
        f"BatchNorm layers in eval mode (statistics of the backbone).",
        f"- Seeds {p['seeds']}, paired across arms (labelled subset, head init, data order, augmentation). "
        f"A fifth of each class's labelled images is the validation split; test images are never used to choose.",
        f"- {p['threads']} torch thread(s), {p['machine']}, torch {p['torch']}, timm {p['timm']}; "
        f"runs took {p['wall_seconds'] / 60:.1f} min in all (parts added; some ran side by side, sharing the cores).",
        *_round_note(result),
        "",
        "Arms: " + "; ".join(f"`{a}`: {t}" for a, t in ARM_TEXT.items()) + ".",
        "",
        *_summary(result),
        "The sign test is exact and two-sided; with 5 seeds its smallest possible p is 0.0625, so the paired "
        "t-test (two-sided) is the sharper of the two.",
        "",
    ]
    for i, setting in enumerate(result["settings"]):
        sp = setting["protocol"]
        old = setting.get("round") == 1
        lines += [
            f"## {'Primary: ' if i == 0 else ''}{sp['target']}, {sp['budget_per_class']} labelled per class"
            + (" (round 1)" if old else ""),
            "",
            *([f"Round-1 numbers (five arms, grid {sp['lr_grid']}), not run again in round 2: see "
               "`efficacy_round1.md`.", ""] if old else []),
            f"{sp['val_per_class']} of them per class for validation; test: {sp['test_images']} images.",
            "",
            *_arm_table(setting),
            "",
            *([f"Paired per seed, {sp['setting']}:", "", *_pairs_table(setting["pairs"]), ""] if setting.get("pairs") else []),
            "Gates after fine-tuning (all blocks and seeds, on the test images):",
            "",
            *_gate_arm_table(setting),
            "",
        ]
        if setting.get("stages"):
            lines += ["Per stage, arm `se`, mean over seeds:", "", *_stage_table(setting["stages"]), "",
                      _dead_stages(setting["stages"]), ""]
    if result.get("study"):
        lines += [
            "## SE learning rate, optimizer and warm-up (primary setting, every seed)"
            + (" (round 1)" if result.get("study_round") == 1 else ""),
            "",
            *(["Round-1 numbers, not run again in round 2: the learning rates named are round 1's choices "
               "(grid 3e-4..3e-3).", ""] if result.get("study_round") == 1 else []),
            "Each recipe changes one thing against the arm it is paired with; a learning rate not in the grid was "
            "chosen for that optimizer beforehand. Last column: the last stage's gate mean, the share of "
            "saturated gates (within 0.02 of 0 or 2) and of gates within 0.02 of 1, over all seeds.",
            "",
            *_study_table(result["study"]),
            "",
        ]
    if result.get("scratch"):
        lines += _scratch_section(result["scratch"])
    lines += [f"![{name}]({name})" for name in plots]
    return "\n".join(lines) + "\n"


def _round_note(result: dict[str, Any]) -> list[str]:
    """Which parts are round 1's numbers (not run again), if any."""
    old = [s["protocol"]["setting"] for s in result.get("settings", []) if s.get("round") == 1]
    parts = ([f"settings {', '.join(old)}"] if old else []) + (
        ["the SE learning-rate study"] if result.get("study_round") == 1 else [])
    if not parts:
        return []
    return ["- Round 2 ran every setting not marked (round 1) with every arm and the searched grids"
            + (", and the from-scratch part" if result.get("scratch") else "")
            + f"; {' and '.join(parts)}: round 1's numbers (five arms, grid 3e-4..3e-3), marked (round 1), "
            "not run again for lack of machine time."]


def _png(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return atomic_write(path, lambda f: f.write(buffer.getvalue()))


def write_plots(result: dict[str, Any], out: Path) -> list[Path]:
    """efficacy.png (each seed a point, per arm and setting, and its difference to plain) and efficacy_gates.png."""
    import matplotlib

    matplotlib.use("Agg")
    paths = []
    if result.get("settings"):  # a --part scratch run has no transfer settings
        paths += [_accuracy_plot(result, out / "efficacy.png"), _gate_plot(result, out / "efficacy_gates.png")]
    if any("trainable_params" in e for e in result.get("arms", {}).values()):
        paths.append(_budget_plot(result, out / "efficacy_budget.png"))
    return paths


def _colour(arm: str, arms: list[str]) -> str:
    """The arm's colour; LoRA arms (any rank) C7, C8, C9 in order."""
    if arm in _COLOURS:
        return _COLOURS[arm]
    lora = [a for a in arms if a.startswith("lora_r")]
    return f"C{7 + lora.index(arm) % 3}" if arm in lora else "black"


def _budget_plot(result: dict[str, Any], path: Path) -> Path:
    """Primary setting: test accuracy against trained parameters (log x), one point per arm, bars = seed sd."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for arm, e in result["arms"].items():
        if "trainable_params" not in e:
            continue
        ax.errorbar(e["trainable_params"], e["mean"], yerr=e["std"], fmt="o", ms=5, capsize=3,
                    color=_colour(arm, list(result["arms"])), label=arm)
        ax.annotate(arm, (e["trainable_params"], e["mean"]), textcoords="offset points", xytext=(5, -10), fontsize=7)
    ax.set_xscale("log")
    ax.set(xlabel="trained parameters (log scale)", ylabel="test accuracy (mean ± sd over seeds)")
    p = result["protocol"]
    ax.set_title(f"{p['target']}, {p['budget_per_class']} labelled per class: accuracy against budget", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return _png(fig, path)


#: One colour per arm in every panel.
_COLOURS = {"plain": "C0", "se": "C1", "se_naive": "C2", "se_adapter": "C3", "head_only": "C4", "bn_tune": "C5",
            "se_bn": "C6"}
#: Arms whose paired differences get the zoomed lower panels (the adapters are ~10 points lower).
_CLOSE = ("se", "se_naive")


def _accuracy_plot(result: dict[str, Any], path: Path) -> Path:
    import matplotlib.pyplot as plt

    settings = result["settings"]
    fig, axes = plt.subplots(2, len(settings), figsize=(3.6 * len(settings), 6.4), squeeze=False)
    for col, setting in enumerate(settings):
        arms = list(setting["arms"])
        top, bottom = axes[0][col], axes[1][col]
        for x, arm in enumerate(arms):
            e = setting["arms"][arm]
            jitter = np.linspace(-0.15, 0.15, len(e["final_acc"]))
            top.scatter(x + jitter, e["final_acc"], s=14, alpha=0.8, color=_colour(arm, arms))
            top.hlines(e["mean"], x - 0.3, x + 0.3, color="black", lw=1)
        close = [a for a in _CLOSE if "paired_vs_plain" in setting["arms"].get(a, {})]
        for x, arm in enumerate(close):
            d = setting["arms"][arm]["paired_vs_plain"]["diffs"]
            bottom.scatter(x + np.linspace(-0.15, 0.15, len(d)), np.array(d) * 100, s=16, alpha=0.8, color=_COLOURS[arm])
            bottom.hlines(np.mean(d) * 100, x - 0.3, x + 0.3, color="black", lw=1)
        sp = setting["protocol"]
        top.set_title(f"{sp['target'].replace('_', '-')}, {sp['budget_per_class']}/class", fontsize=9)
        top.set_xticks(range(len(arms)), arms, rotation=35, fontsize=7)
        bottom.set_xticks(range(len(close)), [f"{a} − plain" for a in close], fontsize=7)
        bottom.set_xlim(-0.6, len(close) - 0.4)
        bottom.axhline(0, color="grey", lw=0.8)
        for ax in (top, bottom):
            ax.grid(alpha=0.3)
        if col == 0:
            top.set_ylabel("test accuracy (each seed a point)")
            bottom.set_ylabel("paired difference, points of accuracy")
    fig.suptitle("Fine-tuning a pretrained ResNet with and without retrofitted SE (black: means)", fontsize=10)
    fig.tight_layout()
    return _png(fig, path)


def _gate_plot(result: dict[str, Any], path: Path) -> Path:
    import matplotlib.pyplot as plt

    gates = result.get("gates", {})
    first = gates.get("se", [[]])[0]
    late = [b for b in first if b.get("class_means")]
    picks = [late[0], late[len(late) // 2], late[-1]] if len(late) >= 3 else late
    fig, axes = plt.subplots(1, 1 + len(picks), figsize=(3.6 * (1 + len(picks)), 3.4), squeeze=False)
    ax = axes[0][0]
    for k, (arm, per_seed) in enumerate(gates.items()):
        names = [b["name"] for b in per_seed[0]]
        means = np.array([[b["mean"] for b in seed] for seed in per_seed]).mean(0)
        lows = np.array([[b["min"] for b in seed] for seed in per_seed]).min(0)
        highs = np.array([[b["max"] for b in seed] for seed in per_seed]).max(0)
        x = np.arange(len(names)) + (k - 1) * 0.2
        ax.errorbar(x, means, yerr=[means - lows, highs - means], fmt="o", ms=4, capsize=2, label=arm)
    if gates:
        ax.set_xticks(range(len(names)), [n.removesuffix(".se") for n in names], rotation=45, fontsize=7)
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set(ylabel="gate: mean, min to max", title="gates per block (all seeds)")
    ax.legend(fontsize=7)
    for ax, block in zip(axes[0][1:], picks, strict=True):
        order = None
        for cls, values in sorted(block["class_means"].items(), key=lambda kv: int(kv[0])):
            values = np.asarray(values)
            order = np.argsort(values) if order is None else order
            ax.plot(values[order], lw=0.9, label=f"class {cls}")
        ax.set(title=f"{block['name']}: mean gate per class", xlabel="channel (sorted by the first class)")
        ax.legend(fontsize=6)
    fig.suptitle("arm se, primary setting, seed 0 (the SE paper's Fig. 6 analysis on this model)", fontsize=9)
    fig.tight_layout()
    return _png(fig, path)
