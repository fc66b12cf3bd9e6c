"""The model card of the project's own generator (issue 24): MODEL_CARD.md, card/results.json
and the card's figures, from training.json and the evaluations workers/default_model_card.py
ran. Numbers, not adjectives; every distance names its feature space.

The card folder never receives a figure that shows a real patient's photo: only the loss
curves, the model's own images, and the evaluations' ITA, PCA and PRDC figures.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from matplotlib.figure import Figure
from PIL import Image

from app.cli.client import Client
from app.vocabulary import weights_sha256
from models.ita import spearman
from workers.evaluation_figures import _figure, render

SKIN_TONES = range(1, 7)
# figures copied from the evaluations' reports (they show no photos): (evaluation, figure)
COPIED = (("full-size", "ita"), ("full-size", "pca"), ("full-size", "prdc"),
          ("64px", "pca"), ("64px", "prdc"))  # fmt: skip
OBSERVATIONS = "observations.md"


def fetch_sheet_images(client: Client, dataset_id: str, folder: Path) -> dict[str, Path]:
    """One image per (condition, type) of a synthetic dataset (the lowest seed), downloaded
    through its manifest's URLs; "condition/type" -> file."""
    chosen: dict[str, dict[str, Any]] = {}
    for row in client.manifest(dataset_id):
        key = f"{row['condition']}/{row['skin_tone']}"
        if key not in chosen or (row["seed"], row["image_id"]) < (
            chosen[key]["seed"],
            chosen[key]["image_id"],
        ):
            chosen[key] = row
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    with httpx.Client(timeout=60, follow_redirects=True) as http:
        for key, row in sorted(chosen.items()):
            path = folder / f"{row['image_id']}.png"
            path.write_bytes(http.get(row["url"]).raise_for_status().content)
            out[key] = path
    return out


# --- figures -----------------------------------------------------------------------------


def loss_curves(losses: dict[str, list[float]]) -> Figure:
    """Per-step training loss of each stage, with a moving average of 50 steps."""
    stages = [s for s in ("autoencoder", "text-to-image", "inpaint") if losses.get(s)]
    figure = _figure(4.2 * max(len(stages), 1), 3.6)
    for i, stage in enumerate(stages):
        ax = figure.add_subplot(1, len(stages), i + 1)
        values = np.asarray(losses[stage], dtype=float)
        steps = np.arange(1, len(values) + 1)
        ax.plot(steps, values, linewidth=0.5, alpha=0.4, label="per step")
        window = min(50, len(values))
        smooth = np.convolve(values, np.ones(window) / window, mode="valid")
        ax.plot(steps[window - 1 :], smooth, linewidth=1.5, label=f"mean of {window}")
        ax.set_title(f"{stage} ({len(values)} steps)")
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.legend(fontsize=7)
    figure.suptitle("Training loss per stage (training.json)")
    figure.tight_layout()
    return figure


def sheet_figure(sheet: dict[str, Path], conditions: Sequence[str], model: str) -> Figure:
    """Rows: conditions; columns: requested Fitzpatrick type 1..6; one synthetic image each."""
    rows = max(len(conditions), 1)
    height = 0.9 + rows * 0.9  # inches; the top 0.8 hold the title and the column heads
    figure = _figure(2.4 + 6 * 0.9, height)
    axes = figure.subplots(rows, 6, squeeze=False)
    for r, condition in enumerate(conditions):
        for c, skin_tone in enumerate(SKIN_TONES):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            path = sheet.get(f"{condition}/{skin_tone}")
            if path is not None:
                ax.imshow(np.asarray(Image.open(path).convert("RGB")))
            if r == 0:
                ax.set_title(f"type {skin_tone}", fontsize=8)
            if c == 0:
                ax.set_ylabel(condition, fontsize=6, rotation=0, ha="right", va="center")
    figure.suptitle(f"{model}: one synthetic image per condition x requested type (no photos)",
                    fontsize=9, y=1 - 0.15 / height)  # fmt: skip
    figure.subplots_adjust(left=0.26, right=0.98, top=1 - 0.8 / height, bottom=0.01,
                           wspace=0.05, hspace=0.05)  # fmt: skip
    return figure


def _save(
    figure: Figure, folder: Path, name: str, formats: Sequence[str] = ("png", "svg")
) -> list[str]:
    written = []
    for fmt, data in render(figure).items():
        if fmt in formats:
            (folder / f"{name}.{fmt}").write_bytes(data)
            written.append(f"{name}.{fmt}")
    return written


# --- numbers -----------------------------------------------------------------------------


def _n(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _ci(pair: Any, digits: int = 3) -> str:
    if not pair or pair[0] is None:
        return ""
    return f" [{pair[0]:.{digits}f}, {pair[1]:.{digits}f}]"


def targets(facts: dict[str, Any]) -> dict[str, Any]:
    """Issue 24's four targets, each with its value and whether it is met."""
    ev = {name: e["result"] for name, e in facts["evaluations"].items()}
    space = ev["full-size"]["feature_space"]["name"]
    # 1. CAS at the generator's resolution, against chance
    utility = ev["64px"]["utility"]
    classes = utility.get("classes", [])
    chance = 1 / len(classes) if classes else None
    cas = (utility.get("synthetic") or {}).get("top1")
    # 2. Spearman(type, median ITA), medians in the real photos' order
    by_type = ev["full-size"]["skin_tone"]["by_type"]
    medians = {side: {t: by_type[str(t)][side].get("median") for t in SKIN_TONES}
               for side in ("synthetic", "real")}  # fmt: skip
    both = [t for t in SKIN_TONES if None not in (medians["synthetic"][t], medians["real"][t])]
    rho = spearman(np.array(both, dtype=float), np.array([medians["synthetic"][t] for t in both]))
    rho_real = spearman(np.array(both, dtype=float), np.array([medians["real"][t] for t in both]))
    order = {side: sorted(both, key=lambda t: -medians[side][t]) for side in medians}
    # 3. FD against tiny-random's on the same reference, at the same sizes
    fd_model = ev["full-size"]["fidelity"]["overall"][f"fd_{space}"]
    fd_tiny = ev["tiny-random"]["fidelity"]["overall"][f"fd_{space}"]
    # 4. the copy fraction of the audit (the privacy gate: at least 2,000 images audited)
    audit = ev["privacy"]["memorisation"]
    fraction = audit[f"copy_fraction_{space}"]
    return {
        "space": space,
        "cas_64px": {
            "target": "top-1 accuracy of a head trained on the synthetic images >= 2x chance, "
            "tested on the 64-px test photos of the commonest conditions",
            "value": cas, "ci": (utility.get("synthetic") or {}).get("top1_ci"),
            "chance": chance, "classes": len(classes),
            "met": cas is not None and chance is not None and cas >= 2 * chance,
        },
        "ita_spearman": {
            "target": "Spearman(requested type, median ITA) <= -0.9 (ITA falls as the type "
            "rises: 0.9 in magnitude) and the medians in the real photos' order",
            "value": None if math.isnan(rho) else round(rho, 4),
            "real": None if math.isnan(rho_real) else round(rho_real, 4),
            "types": both, "order_synthetic": order["synthetic"], "order_real": order["real"],
            "met": not math.isnan(rho) and rho <= -0.9 and order["synthetic"] == order["real"]
            and len(both) == 6,
        },
        "fd_vs_tiny_random": {
            "target": f"fd_{space} <= half of tiny-random's, on the same reference",
            "value": fd_model, "tiny_random": fd_tiny,
            "ratio": round(fd_model / fd_tiny, 4) if fd_model is not None and fd_tiny else None,
            "met": fd_model is not None and fd_tiny is not None and fd_model <= fd_tiny / 2,
        },
        "copy_fraction": {
            "target": f"copy fraction (cosine_{space} >= the calibrated threshold) < 1%, on at "
            "least 2,000 images",
            "value": fraction, "ci": audit[f"copy_fraction_{space}_ci"],
            "audited": audit["audited"], "threshold": audit["threshold"]["value"],
            "met": fraction is not None and fraction < 0.01 and audit["audited"] >= 2000,
        },
    }  # fmt: skip


# --- the card ----------------------------------------------------------------------------


def _interval(made: dict[str, Any]) -> str:
    """' on the part 0.4-1 of the schedule (guidance_interval)' for a model sampled with a
    guidance interval, else nothing."""
    interval = made.get("guidance_interval")
    if not interval:
        return ""
    return f" on the part {interval[0]}-{interval[1]} of the schedule (guidance_interval)"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(str(c) for c in row) + " |" for row in rows), ""]  # fmt: skip


def _fidelity_rows(ev: dict[str, Any], space: str) -> list[list[Any]]:
    rows = []
    for name, label in (("full-size", "synthderm-fitz64 vs full-size photos"),
                        ("vs-test", "synthderm-fitz64 vs full-size held-out test photos"),
                        ("64px", "synthderm-fitz64 vs 64-px photos"),
                        ("tiny-random", "tiny-random vs full-size photos")):  # fmt: skip
        o = ev[name]["fidelity"]["overall"]
        compared = o["n_compared"]
        row = [label, f"{compared['synthetic']} vs {compared['real_half']}"]
        for m in ("fd", "kid", "precision", "recall", "density", "coverage"):
            # the 95% bootstrap interval where the evaluation gives one (reports since issue 23)
            value = f"{_n(o[f'{m}_{space}'])}{_ci(o.get(f'{m}_{space}_ci'))}"
            row.append(f"{value} ({_n(o[f'{m}_{space}_floor'])})")
        rows.append(row)
    return rows


def card_markdown(facts: dict[str, Any], goals: dict[str, Any], figures: list[str],
                  observations: str | None) -> str:  # fmt: skip
    t = facts["training"]
    ev = {name: e["result"] for name, e in facts["evaluations"].items()}
    space = goals["space"]
    config, data = t["config"], t["data"]
    made = facts["generation"]["synthderm-fitz64"]
    met = {True: "met", False: "NOT met"}
    latent = config["resolution"] // 2 ** (len(config["vae_channels"]) - 1)
    lines = [
        "# synthderm-fitz64", "",
        "The project's own generator (issue 24): a 64-px latent diffusion model trained from "
        "scratch on the Fitzpatrick17k photos' train split, served by the embedded default as "
        "`synthderm-fitz64` (text-to-image, image-to-image) and `synthderm-fitz64-inpaint` "
        "(inpaint, inpaint-outpaint). Two diffusers pipeline folders: `text-to-image/` "
        "(StableDiffusionPipeline) and `inpaint/` (StableDiffusionInpaintPipeline).", "",
        "**Licence: research and non-commercial use only.** The Fitzpatrick17k images are for "
        "research and non-commercial use, and so are these weights, which are learned from "
        "them (../shared/data/README.md).", "",
        "Weights evaluated here (sha256 over the weight files, as every generated image "
        "records it): "
        + "; ".join(f"`{n}/` `{h}`" for n, h in facts.get("weights_sha256", {}).items())
        + ".", "",
        "## Data", "",
        f"{data['images']} photos of the `{data['split']}` split of {data['dataset']}; the "
        "`test` split was never seen in training. Conditions left out: "
        f"{', '.join(data['conditions_left_out']) or 'none'}.", "",
        *_table(["condition", "photos"], [[c, n] for c, n in data["per_condition"].items()]),
        *_table(["Fitzpatrick type", "photos"], [[k, v] for k, v in data["per_skin_tone"].items()]),
        "## Architecture", "",
        f"Resolution {config['resolution']} px; autoencoder (AutoencoderKL) channels "
        f"{config['vae_channels']}, latents {latent} px (scaling factor "
        f"{_n(t.get('latent_scaling_factor'), 4)}); text encoder (CLIP text model) width "
        f"{config['text_width']}, {config['text_layers']} layers; UNet2DConditionModel channels "
        f"{config['unet_channels']}; the inpainting UNet has 9 input channels.", "",
        *_table(["component", "parameters"],
                [[k, f"{v:,}"] for k, v in t["parameters"].items()]
                + [["total (text-to-image + inpaint UNet)", f"{sum(t['parameters'].values()):,}"]]),
        "## Training", "",
        *_table(["stage", "steps", "seconds", "first loss", "final loss (mean of last 50)"],
                [[s, v["steps"], v["seconds"], _n(v["first_loss"], 4),
                  _n(v["final_loss_mean_of_last_50"], 4)] for s, v in t["training"].items()]),
        f"Reconstruction PSNR of the autoencoder: {t['reconstruction_psnr_db']} dB. Wall time "
        f"(last session): {t['wall_seconds_this_session']} s on {t['machine']['cpus']} CPUs "
        f"({t['machine']['device']}, {t['machine']['platform']}, torch {t.get('torch')}); "
        f"seed {config['seed']}. Loss curves: `card/loss-curves.png`.", "",
        "## Evaluation", "",
        f"{made['images']} images from `synthderm-fitz64` ({made['per_cell']} per condition x "
        f"requested Fitzpatrick type 1..6, {len(made['conditions'])} conditions, text-to-image, "
        f"{made['steps']} steps, guidance {made['guidance_scale']}{_interval(made)}, fixed seeds "
        f"in card/results.json), and {facts['generation']['tiny-random']['images']} from "
        f"`tiny-random` on the {len(facts['commonest'])} commonest conditions "
        f"({', '.join(facts['commonest'])}). Real photos uploaded: {facts['real']['photos']} "
        f"({facts['real']['by_split']}), and the same at 64 px (short side 64, bicubic, centre "
        "square). Each evaluation's reference (fidelity, ITA, the real utility baseline, the "
        "audit) is the train split and its test split the held-out `test` photos: the service "
        "refuses a reference that is also the test split. One more evaluation (`vs-test`) takes "
        "the held-out test photos as the reference, for fidelity against photos the model never "
        "saw (its utility score, tested on the train split, is not used). Feature space: "
        f"{ev['full-size']['feature_space']['backbone']} (`{space}`, d = "
        f"{ev['full-size']['feature_space']['dim']}).", "",
        "### Targets", "",
        *_table(["target", "value", "met"], [
            [goals["cas_64px"]["target"],
             f"{_n(goals['cas_64px']['value'])}{_ci(goals['cas_64px']['ci'])} vs chance "
             f"{_n(goals['cas_64px']['chance'])} ({goals['cas_64px']['classes']} classes)",
             met[goals["cas_64px"]["met"]]],
            [goals["ita_spearman"]["target"],
             f"{_n(goals['ita_spearman']['value'])} (real photos: "
             f"{_n(goals['ita_spearman']['real'])}); order by falling median ITA: synthetic "
             f"{goals['ita_spearman']['order_synthetic']}, real "
             f"{goals['ita_spearman']['order_real']}", met[goals["ita_spearman"]["met"]]],
            [goals["fd_vs_tiny_random"]["target"],
             f"fd_{space} {_n(goals['fd_vs_tiny_random']['value'], 2)} vs tiny-random "
             f"{_n(goals['fd_vs_tiny_random']['tiny_random'], 2)} (ratio "
             f"{_n(goals['fd_vs_tiny_random']['ratio'])})", met[goals["fd_vs_tiny_random"]["met"]]],
            [goals["copy_fraction"]["target"],
             f"{_n(goals['copy_fraction']['value'], 4)}{_ci(goals['copy_fraction']['ci'], 4)} of "
             f"{goals['copy_fraction']['audited']} images", met[goals["copy_fraction"]["met"]]],
        ]),
        f"### Fidelity and diversity (`{space}` features; the real-vs-real floor in "
        "parentheses, 95% bootstrap intervals in square brackets)", "",
        "Each value compares the synthetic images (a random subsample of half the reference "
        "when there are more) with one random half of the reference; the floor is that half "
        "against the other: FD is biased by about d / n, so compare a value only with its "
        "floor and with rows of the same sizes.", "",
        *_table(["synthetic vs reference", "n compared", f"fd_{space}", f"kid_{space}",
                 "precision", "recall", "density", "coverage"], _fidelity_rows(ev, space)),
        "### Classification accuracy score (the commonest conditions)", "",
        "A linear head on the frozen features, trained on the synthetic images alone, beside "
        "the same head trained on as many real train photos per condition; both tested on the "
        "held-out test photos at the same size as the reference.", "",
    ]  # fmt: skip
    rows = []
    for name, label in (("64px", "64 px (the generator's resolution)"), ("full-size", "full size")):
        u = ev[name]["utility"]
        if "synthetic" not in u:
            rows.append([label, u.get("note", "n/a"), "", "", ""])
            continue
        rows.append([label, len(u["classes"]), _n(1 / len(u["classes"])),
                     f"{_n(u['synthetic']['top1'])}{_ci(u['synthetic']['top1_ci'])}",
                     f"{_n(u['real']['top1'])}{_ci(u['real']['top1_ci'])}"])  # fmt: skip
    lines += _table(["test photos", "classes", "chance", "synthetic-trained top-1",
                     "real-trained top-1 (same count)"], rows)  # fmt: skip
    tone = ev["full-size"]["skin_tone"]
    ita_rows = []
    for skin_tone in SKIN_TONES:
        s, r = tone["by_type"][str(skin_tone)]["synthetic"], tone["by_type"][str(skin_tone)]["real"]
        ita_rows.append([skin_tone, s["n"], _n(s.get("median"), 1),
                         f"{_n(s.get('in_band'))}{_ci(s.get('in_band_ci'))}", r["n"],
                         _n(r.get("median"), 1), f"{_n(r.get('in_band'))}"])  # fmt: skip
    lines += [
        "### Skin tone: ITA by requested type (degrees; full-size real photos)", "",
        *_table(["type", "synthetic n", "median ITA", "in type's band", "real n",
                 "real median ITA", "real in band"], ita_rows),
        f"Spearman(type, ITA) per image: synthetic {_n(tone['spearman_synthetic'])}, real "
        f"{_n(tone['spearman_real'])}; of the medians: {_n(goals['ita_spearman']['value'])}.", "",
    ]  # fmt: skip
    audit = ev["privacy"]["memorisation"]
    threshold = audit["threshold"]
    groups = [[g, v["n"], v["copies"], f"{_n(v['fraction'], 4)}{_ci(v['ci'], 4)}"]
              for g, v in audit["by_skin_tone"].items()]  # fmt: skip
    gate = goals["copy_fraction"]
    lines += [
        "## Privacy gate", "",
        f"Every generated image ({audit['audited']}) against the model's "
        f"{ev['privacy']['reference']['images']} training photos: its nearest training photo by "
        f"cosine in `{space}`, flagged at or above the calibrated threshold "
        f"{_n(threshold['value'], 4)} (it takes {_n(threshold['copy_rate'])} of augmented copies "
        f"and {_n(threshold['other_rate'])} of nearest other photos). Copy fraction: "
        f"**{_n(gate['value'], 4)}**{_ci(gate['ci'], 4)} (the gate: < 0.01 on >= 2,000 images: "
        f"**{'passed' if gate['met'] else 'NOT passed'}**). Median nearest cosine "
        f"{_n(audit[f'nearest_cosine_{space}_median'])}, median SSIM (64 px, grey) "
        f"{_n(audit['nearest_ssim_median'])}.", "",
        *_table(["Fitzpatrick group", "images", "flagged", "fraction [95% CI]"], groups),
        "## Figures", "",
        *[f"![{Path(f).stem}](card/{f})" for f in figures if f.endswith(".png")], "",
        "The evaluations' contact sheets and closest pairs show patients' photos: they stay in "
        "the work folder and are never committed.", "",
        "## What the images look like", "",
        observations or "_Not written yet: card/observations.md (written by hand after "
        "looking at the images) does not exist._", "",
        "## How to remake this card", "",
        "```bash",
        "make default-model          # trains models/synthderm-fitz64 (training.json)",
        "make default-model-card     # this card: " + facts["command"],
        "```", "",
        f"It took {facts['timings']['total_s']:.0f} s here (service start, uploads, generation, "
        "four evaluations: card/results.json `timings`).", "",
    ]  # fmt: skip
    return "\n".join(lines)


def write_card(facts: dict[str, Any], *, out: Path, sheet: dict[str, Path]) -> None:
    """MODEL_CARD.md in OUT, its figures and results.json in OUT/card."""
    folder = out / "card"
    folder.mkdir(parents=True, exist_ok=True)
    figures = _save(loss_curves(facts["training"].get("losses", {})), folder, "loss-curves")
    # PNG only: an SVG of 126 embedded rasters is megabytes and shows nothing more
    figures += _save(sheet_figure(sheet, facts["conditions"], "synthderm-fitz64"), folder,
                     "contact-sheet-synthetic", formats=("png",))  # fmt: skip
    for evaluation, name in COPIED:
        report = Path(facts["evaluations"][evaluation]["report"])
        for fmt in ("png", "svg"):
            if (report / f"{name}.{fmt}").is_file():
                shutil.copyfile(report / f"{name}.{fmt}", folder / f"{name}-{evaluation}.{fmt}")
                figures.append(f"{name}-{evaluation}.{fmt}")
    facts["weights_sha256"] = weights_of(Path(facts["model_dir"]))
    goals = targets(facts)
    # training.json keeps the per-step losses (the loss curves show them)
    training = {k: v for k, v in facts["training"].items() if k != "losses"}
    results = {**facts, "training": training, "targets": goals, "figures": figures}
    (folder / "results.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    notes = folder / OBSERVATIONS
    observations = notes.read_text().strip() if notes.is_file() else None
    (out / "MODEL_CARD.md").write_text(card_markdown(facts, goals, figures, observations))


def weights_of(model: Path) -> dict[str, str]:
    """The sha256 of each pipeline folder's weights (app.vocabulary.weights_sha256)."""
    return {name: weights_sha256(model / name) for name in ("text-to-image", "inpaint")}


def rewrite_card(*, out: Path, model: Path) -> None:
    """MODEL_CARD.md again from OUT/card/results.json and the hand-written observations, with
    nothing generated or evaluated (after editing card/observations.md)."""
    folder = out / "card"
    results = json.loads((folder / "results.json").read_text())
    facts = {k: v for k, v in results.items() if k not in ("targets", "figures")}
    facts["training"] = json.loads((model / "training.json").read_text())
    audited = facts.get("weights_sha256")
    if audited is not None and audited != weights_of(model):
        raise SystemExit("--rewrite: the weights changed since the card's evaluation; remake it")
    if audited is None:  # a card made before the hashes were recorded: record them now
        facts["weights_sha256"] = results["weights_sha256"] = weights_of(model)
        (folder / "results.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    notes = folder / OBSERVATIONS
    observations = notes.read_text().strip() if notes.is_file() else None
    markdown = card_markdown(facts, targets(facts), results["figures"], observations)
    (out / "MODEL_CARD.md").write_text(markdown)
