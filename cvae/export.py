"""The pretrained whole-grid model that ships inside the package, in `cvae/pretrained/`.

`export(run)` turns a finished run of `configs/pretrained.yaml` (python -m jobs.pipeline)
into the shipped files:

    model.pt         the best checkpoint's weights (a state dict, loaded with weights_only=True)
    checkpoint.json  model spec, config, data manifest, the grid it answers, epoch history,
                     provenance (command, seed, commit, data fingerprint, hardware, time)
                     and its evaluation
    MODEL_CARD.md    the same for people
    SHA256SUMS       the checksum of each file, checked at every load
                     (cvae.model.checkpoint.pretrained_checkpoint)

The name `pretrained` stands for this folder wherever a checkpoint is asked for.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
from pathlib import Path

import torch

from cvae.causal.image import ImageSCM
from cvae.data.fidelity import load_reference
from cvae.evaluate.official import score_official
from cvae.model.checkpoint import (
    CHECKSUMS,
    META,
    PRETRAINED_DIR,
    WEIGHTS,
    CheckpointError,
    load_checkpoint,
    load_meta,
    model_grid,
    resolve_checkpoint,
)

CARD = "MODEL_CARD.md"
MAX_BYTES = 10 * 2**20  # what the package may carry
COMMAND = ("python -m jobs.pipeline --config configs/pretrained.yaml && "
           "python -m jobs.export_pretrained --run runs/pretrained")


def export(run: str | Path, out: str | Path = PRETRAINED_DIR, command: str = COMMAND) -> dict:
    """Write the shipped files from pipeline run folder `run` (holding train/, eval/ and
    summary.json) into `out`; returns the new checkpoint.json. Refuses a run that did not
    finish, weights over MAX_BYTES, or a model whose grid is not the whole grid."""
    run, out = Path(run), Path(out)
    summary, report = _read_json(run / "summary.json"), _read_json(run / "eval" / "report.json")
    checkpoint = Path(resolve_checkpoint(run / "train"))
    meta = load_meta(checkpoint)
    load_checkpoint(checkpoint)  # the weights fit the spec
    weights = checkpoint / WEIGHTS
    if weights.stat().st_size > MAX_BYTES:
        raise CheckpointError(f"{weights}: {weights.stat().st_size:,} bytes, over the {MAX_BYTES:,} "
                              f"the package carries")
    grid = model_grid(meta)
    if not grid.is_whole():
        raise CheckpointError(f"{checkpoint}: answers {grid!r}, not the whole grid; the pretrained model must")
    scm = ImageSCM.from_checkpoint(checkpoint, device="cpu")
    shipped = {
        **meta,
        "grid": grid.to_dict(),
        "provenance": _provenance(run, checkpoint, meta, summary, command),
        "evaluation": _evaluation(report),
        "official_frames": score_official(scm, *load_reference()),
    }
    out.mkdir(parents=True, exist_ok=True)
    for name in (WEIGHTS, META, CARD, CHECKSUMS):
        (out / name).unlink(missing_ok=True)
    shutil.copyfile(weights, out / WEIGHTS)
    (out / META).write_text(json.dumps(shipped, indent=1, sort_keys=True))
    (out / CARD).write_text(model_card(shipped))
    sums = "".join(f"{hashlib.sha256((out / n).read_bytes()).hexdigest()}  {n}\n" for n in (WEIGHTS, META, CARD))
    (out / CHECKSUMS).write_text(sums)
    return shipped


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: run `python -m jobs.pipeline --config configs/pretrained.yaml` "
                              f"to the end first")
    return json.loads(path.read_text())


def _provenance(run: Path, checkpoint: Path, meta: dict, summary: dict, command: str) -> dict:
    manifest = meta.get("manifest") or {}
    stage = _read_json(run / "data" / "_stage.json") if (run / "data" / "_stage.json").is_file() else {}
    history = meta.get("history") or []
    return {
        "command": command,
        "seed": (meta.get("config") or {}).get("seed"),
        "commit": _commit(),
        "checkpoint": f"{checkpoint.parent.name}/{checkpoint.name}",
        "data": {"fingerprint": stage.get("fingerprint"),
                 "manifest_sha256": hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest(),
                 "generator": manifest.get("generator"), "renderer": manifest.get("renderer"),
                 "counts": manifest.get("counts")},
        "hardware": {"cpu": _cpu(), "cores": os.cpu_count(), "torch": torch.__version__,
                     "python": platform.python_version()},
        "training_seconds": round(sum(float(h.get("seconds") or 0) for h in history), 1),
        "pipeline_seconds": summary.get("seconds"),
    }


def _commit() -> str | None:
    """The commit the export ran at, with '+changes' when the tree had uncommitted changes."""
    root = Path(__file__).resolve().parents[1]  # cvae/export.py -> the repository
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return head.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _evaluation(report: dict) -> dict:
    """The report's figures the card shows: overall, per factor, per scale, null, controls."""
    def brief(s: dict | None) -> dict | None:
        if not s:
            return None
        return {k: s.get(k) for k in ("count", "iou", "exact", "effectiveness", "preservation",
                                      "effectiveness_by_factor", "preservation_by_factor")}

    return {"queries": report.get("queries"), "rows": report.get("rows"),
            "overall": brief(report.get("overall")),
            "by_intervened_factor": {f: brief(s) for f, s in (report.get("by_factor") or {}).items()},
            "by_scale": {k: brief(s) for k, s in (report.get("by_scale") or {}).items()},
            "null": brief((report.get("null") or {}).get("overall")),
            "controls": {n: brief(c.get("overall")) for n, c in (report.get("controls") or {}).items()}}


def model_card(meta: dict) -> str:
    """MODEL_CARD.md from a shipped checkpoint.json."""
    p, ev, official = meta["provenance"], meta["evaluation"], meta["official_frames"]
    config, data = meta.get("config") or {}, p["data"]
    train = config.get("train") or {}
    lines = [
        "# cvae pretrained: the whole dSprites grid", "",
        f"A supervised causal VAE (`arch: {meta['model'].get('arch')}`) trained on the training split of all "
        f"737,280 dSprites images (rendered with the official geometry, renderer version {data['renderer']}). "
        "It answers condition, intervention and counterfactual queries for every class of every factor: "
        "`python -m jobs.query --checkpoint pretrained ...`, `CausalModel.load(\"pretrained\")`.", "",
        "## Provenance", "",
        f"- command: `{p['command']}`",
        f"- seed {p['seed']}; commit `{p['commit']}`; checkpoint {p['checkpoint']} (epoch {meta.get('epoch')})",
        f"- data: fingerprint `{data['fingerprint']}`, manifest sha256 `{data['manifest_sha256']}`, "
        f"generator {data['generator']}, rows {data['counts']}",
        f"- hardware: {p['hardware']['cpu']}, {p['hardware']['cores']} cores; torch {p['hardware']['torch']}, "
        f"Python {p['hardware']['python']}",
        f"- training: {train.get('num_workers')} Ray Train CPU workers x {train.get('threads_per_worker')} "
        f"thread, batch {train.get('batch_size')} each, {train.get('epochs')} epochs, Adam lr {train.get('lr')} "
        f"({train.get('lr_schedule')}); **{p['training_seconds'] / 60:.1f} minutes** of training",
        "", "| epoch | train loss | validation loss | test loss | seconds |", "| ---: | ---: | ---: | ---: | ---: |",
    ]
    for h in meta.get("history") or []:
        lines.append(f"| {h.get('epoch')} | {_f3(h.get('train_loss'))} | {_f3(h.get('validation_loss'))} | "
                     f"{_f3(h.get('test_loss'))} | {h.get('seconds', 0):.0f} |")
    lines += _card_evaluation(ev)
    if official.get("overall"):
        lines += _card_official(official)
    lines += ["## Files", "", "`model.pt` (weights only, `torch.load(..., weights_only=True)`), `checkpoint.json` "
              "(all of the above as data), `SHA256SUMS` (checked at every load).", ""]
    return "\n".join(lines)


def _f3(v) -> str:
    """A card's figure: three decimals, or a dash for none."""
    return "–" if v is None else f"{v:.3f}"


def _card_evaluation(ev: dict) -> list[str]:
    """The card's evaluation: overall, per factor, per scale, null interventions and controls."""
    o = ev["overall"] or {}
    lines = [
        "", "## Evaluation", "",
        f"{o.get('count')} intervened counterfactuals of test-split sources drawn from the whole grid (one "
        "random other value of each factor per source), each read back over the whole 737,280-image "
        f"grid: **IoU {_f3(o.get('iou'))}, effectiveness {_f3(o.get('effectiveness'))}, preservation "
        f"{_f3(o.get('preservation'))}** (goal: 0.97, 0.99, 0.99).", "",
        "| factor | effectiveness | preservation |", "| --- | ---: | ---: |",
    ]
    for f in ("shape", "scale", "orientation", "pos_x", "pos_y"):
        lines.append(f"| {f} | {_f3(o.get('effectiveness_by_factor', {}).get(f))} | "
                     f"{_f3(o.get('preservation_by_factor', {}).get(f))} |")
    lines += ["", "| scale of the answer | rows | IoU | effectiveness | preservation |",
              "| ---: | ---: | ---: | ---: | ---: |"]
    for k, s in ev["by_scale"].items():
        if s:
            lines.append(f"| {k} | {s['count']} | {_f3(s['iou'])} | {_f3(s['effectiveness'])} | "
                         f"{_f3(s['preservation'])} |")
    null, controls = ev.get("null") or {}, ev.get("controls") or {}
    lines += ["", f"Null interventions (do = the factual value): {null.get('count')}, exact {_f3(null.get('exact'))}. "
              "Controls, effectiveness / preservation: " + ", ".join(
                  f"{n} {_f3((c or {}).get('effectiveness'))} / {_f3((c or {}).get('preservation'))}"
                  for n, c in controls.items()) + ".", ""]
    return lines


def _card_official(official: dict) -> list[str]:
    """The card's counterfactuals of official dSprites frames."""
    lines = ["## Official frames", "",
             f"Counterfactuals of official dSprites frames (the {official['frames']} reference frames of "
             f"the official README's animation, given as images): every ordered pair of frames that differ "
             f"in one factor ({official['pairs']} pairs, {official['refused']} refused), the answer compared "
             f"with the official target frame: mean IoU {official['overall']['mean_iou']:.3f}, min "
             f"{official['overall']['min_iou']:.3f}, {official['overall']['exact']} pixel-exact.", "",
             "| intervened factor | pairs | mean IoU | min IoU | exact |", "| --- | ---: | ---: | ---: | ---: |"]
    for f, s in official["by_factor"].items():
        lines.append(f"| {f} | {s['pairs']} | {s['mean_iou']:.3f} | {s['min_iou']:.3f} | {s['exact']} |")
    lines.append("")
    return lines
