"""The evaluation's outputs: report.json's sections from the reduced sums, the headline
lines the jobs print, report.md, and the figures of answers beside the truth."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from cvae.data.grid import FACTOR_SIZES, FACTORS
from cvae.evaluate.families import markdown_table as family_markdown
from cvae.evaluate.metrics import CONTROLS


def _group_order(name: str) -> tuple:
    return name.count("+"), FACTORS.index(name.split("+")[0])


def _section(groups: dict, answers: str, part: str) -> dict:
    """{"overall", "by_factor", "null": {"overall", "by_factor"}} of one answer set and part."""
    def get(name):
        return groups[(answers, name, part)].summary() if (answers, name, part) in groups else None

    names = sorted({g for a, g, p in groups if a == answers and p == part and g not in ("overall", "null")
                    and not g.startswith("null:")}, key=_group_order)
    nulls = sorted({g[5:] for a, g, p in groups if a == answers and p == part and g.startswith("null:")},
                   key=_group_order)
    return {"overall": get("overall"), "by_factor": {g: get(g) for g in names},
            "null": {"overall": get("null"), "by_factor": {g: get("null:" + g) for g in nulls}}}


def make_report(st, rows: int, unmatched: int, results, checkpoint, queries) -> dict:
    def speed(name):
        n, seconds = st.read.get(name, [0, 0.0])
        return {"answers": n, "seconds": round(seconds, 2),
                "per_second": round(n / seconds, 1) if seconds > 0 else None}

    model = _section(st.groups, "model", "all")
    count, exact, error = st.null
    report = {
        "results": str(results), "checkpoint": str(checkpoint), "queries": str(queries),
        "rows": rows, "rows_without_intervention": unmatched,
        "readout": {"candidates": int(len(st.readout.indices)), "distinct_images": st.readout.distinct_images,
                    "speed": {name: speed(name) for name in ("model",) + CONTROLS}},
        "overall": model["overall"], "by_factor": model["by_factor"], "null": model["null"],
        "composition": {"null_intervention": {"count": count,
                                              "exact": None if not count else round(exact / count, 6),
                                              "pixel_error": None if not count else round(error / count, 6)}},
        "controls": {name: _section(st.groups, name, "all") for name in CONTROLS},
        "holdout_rules": st.holdout,
        "world": {"edges": [list(e) for e in st.world.edges],
                  "classes_agree": None if not st.agree[0] else round(st.agree[1] / st.agree[0], 6)},
    }
    if st.holdout:
        report["holdout"] = {part: _section(st.groups, "model", part) for part in ("holdout", "seen")}
    if st.trained is not None:
        report["training_grid"] = {"classes": st.trained.to_dict()["classes"],
                                   **{part: _section(st.groups, "model", part) for part in ("unseen", "trained")}}
    report["by_scale"] = {str(k): _section(st.groups, "model", f"scale={k}")["overall"]
                          for k in range(FACTOR_SIZES["scale"])}
    return report


# Strata (factual shape, scale) in an order whose first six cover every shape and every scale.
STRATA = [(j % 3, (j + j // 6) % 6) for j in range(18)]


def stratified(strata: dict, count: int) -> list:
    """`count` items from {(shape, scale): [items, best first]}, round-robin over the strata
    in STRATA order: the first of every stratum before any second one."""
    shown = []
    for rank in range(count):
        shown += [strata[s][rank] for s in STRATA if s in strata and len(strata[s]) > rank]
    return shown[:count]


def save_figures(out: Path, figures: dict, per_figure: int) -> list[str]:
    """One grid per intervened group: columns drawn round-robin over the (shape, scale)
    strata of their factual images, rows factual | answer | ground truth."""
    from cvae.figures import save_image_grid  # matplotlib only when a figure is drawn

    written = []
    for name in sorted(figures, key=_group_order):
        shown = stratified(figures[name], per_figure)
        if not shown:
            continue
        path = out / "figures" / f"counterfactuals_{name.replace('+', '_')}.png"
        save_image_grid(path, [np.stack([images[k] for _, images, _ in shown]) for k in range(3)],
                        row_labels=["factual", "answer", "ground truth"],
                        col_labels=[label for *_, label in shown],
                        title=f"do({name}): sources stratified over shape x scale")
        written.append(str(path.relative_to(out)))
    return written


def headline(report: dict) -> list[str]:
    """The report's headline numbers, one line each (printed by jobs.evaluate and jobs.pipeline)."""
    lines = []
    o = report.get("overall")
    if o:
        lines.append(f"{o['count']} intervened: IoU {_fmt(o['iou'])}, effectiveness {_fmt(o['effectiveness'])}, "
                     f"preservation {_fmt(o['preservation'])}, "
                     f"reversibility exact {_fmt(o['reversibility']['exact'])}")
    null = (report.get("null") or {}).get("overall")
    if null:
        lines.append(f"{null['count']} null interventions: exact {_fmt(null['exact'])}, "
                     f"effectiveness {_fmt(null['effectiveness'])}, preservation {_fmt(null['preservation'])}")
    own = report["composition"].get("model") or {}
    if own.get("count"):
        lines.append("model composition (encode-decode, IoU with the factual image): "
                     + ", ".join(f"k={k} {_fmt(v)}" for k, v in own["iou"].items()))
    families = [r for r in report.get("families") or [] if r["tv_images"] is not None]
    if families:
        worst = max(families, key=lambda r: r["tv_images"])
        lines.append(f"condition/intervene families: TV of read-back answers max {_fmt(worst['tv_images'])} "
                     f"({worst['question']}), mean {_fmt(float(np.mean([r['tv_images'] for r in families])))}"
                     f" over {len(families)} questions (goal <= 0.05)")
    parts = []
    for name, section in report["controls"].items():
        c = section["overall"] or {}
        parts.append(f"{name} {_fmt(c.get('effectiveness'))} / {_fmt(c.get('preservation'))}")
    lines.append("controls (effectiveness / preservation): " + ", ".join(parts))
    return lines


def _fmt(value, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _table(section: dict, null_label: str = "null: do({}) = factual") -> list[str]:
    lines = ["| intervened | rows | IoU | pixel error | exact | effectiveness | preservation | descendants | "
             "read nothing | reversibility (n, exact, IoU) |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    rows = {**section["by_factor"], "**overall**": section["overall"]}
    rows.update({null_label.format(g): s for g, s in section["null"]["by_factor"].items()})
    for name, s in rows.items():
        if s is None:
            continue
        r = s["reversibility"]
        lines.append(f"| {name} | {s['count']} | {_fmt(s['iou'])} | {_fmt(s['pixel_error'], 4)} | "
                     f"{_fmt(s['exact'])} | {_fmt(s['effectiveness'])} | {_fmt(s['preservation'])} | "
                     f"{_fmt(s['descendants'])} | "
                     f"{_fmt(s['read_nothing'])} | {r['count']}, {_fmt(r['exact'])}, {_fmt(r['iou'])} |")
    return lines


def markdown(report: dict) -> str:
    """The report as markdown tables: per group, per factor, composition, controls, holdout."""
    model = {"overall": report["overall"], "by_factor": report["by_factor"], "null": report["null"]}
    readout = report["readout"]
    out = ["# Counterfactual evaluation", "",
           f"{report['rows']} counterfactual result rows from `{report['results']}`, "
           f"checkpoint `{report['checkpoint']}`. Each answer is read back to all five factors as "
           f"its nearest ground-truth image by IoU, among {readout['candidates']} ground-truth images "
           f"({readout['distinct_images']} distinct). Null interventions are rows of their own, "
           "outside **overall**.", ""]
    world = report.get("world") or {}
    if world.get("edges"):
        out += [f"The data's factors come from an SCM with edges "
                f"{', '.join(f'{p} -> {c}' for p, c in world['edges'])}. The true counterfactual of a "
                "descendant of an intervened factor is that SCM run on the factual's abducted noise "
                "(the same noise draw the answer used); **descendants** is the share of rows whose "
                "every such descendant reads back as that value, and preservation covers the other "
                f"factors only. Result rows whose own classes are that world: "
                f"{_fmt(world.get('classes_agree'))}.", ""]
    out += _table(model)

    o = report["overall"] or {}
    random = report["controls"]["random"]["overall"] or {}
    out += ["", "## Read back per factor (intervened rows)", "",
            "| factor | effectiveness | preservation | random control: effectiveness | preservation |",
            "| --- | ---: | ---: | ---: | ---: |"]
    for f in FACTORS:
        out.append(f"| {f} | {_fmt(o.get('effectiveness_by_factor', {}).get(f))} | "
                   f"{_fmt(o.get('preservation_by_factor', {}).get(f))} | "
                   f"{_fmt(random.get('effectiveness_by_factor', {}).get(f))} | "
                   f"{_fmt(random.get('preservation_by_factor', {}).get(f))} |")

    out += _md_by_scale(report) + _md_composition(report) + _md_controls(report, model)
    if report.get("families"):
        out += ["", "## Conditioning versus intervening", "",
                "Each question asked `samples` times through the query job; the answer images read "
                "back give the answered distribution of the target, compared by total variation with "
                "the generating SCM's exact one (**TV images**; goal <= 0.05). **TV classes**: the "
                "result rows' own classes (the exact factor sampler). **TV condition vs do**: between "
                "the two exact truths, how different the two questions are. **Sampling floor**: the "
                "mean TV of that many exact draws.", ""] + family_markdown(report["families"])
    if "holdout" in report:
        for part, title in (("holdout", "Rows touching held-out combinations"),
                            ("seen", "Rows on seen combinations")):
            out += ["", f"## {title}", ""] + _table(report["holdout"][part])
    if "training_grid" in report:
        for part, title in (("unseen", "Counterfactuals with a class the training split lacks"),
                            ("trained", "Counterfactuals on the training grid")):
            if report["training_grid"][part]["overall"] or report["training_grid"][part]["null"]["overall"]:
                out += ["", f"## {title}", ""] + _table(report["training_grid"][part])
    if report["figures"]:
        out += ["", "## Figures", ""] + [f"![{f}]({f})" for f in report["figures"]]
    return "\n".join(out) + "\n"


def _md_by_scale(report: dict) -> list[str]:
    """Intervened rows by the scale class of the true counterfactual image."""
    rows = {k: s for k, s in (report.get("by_scale") or {}).items() if s}
    if not rows:
        return []
    out = ["", "## By scale of the counterfactual image (intervened rows)", "",
           "| scale | rows | IoU | effectiveness | preservation | " + " | ".join(
               f"{f} eff. / pres." for f in FACTORS) + " |",
           "| --- | ---: | ---: | ---: | ---: |" + " ---: |" * len(FACTORS)]
    for k, s in rows.items():
        cells = [f"{_fmt(s['effectiveness_by_factor'].get(f))} / {_fmt(s['preservation_by_factor'].get(f))}"
                 for f in FACTORS]
        out.append(f"| {k} | {s['count']} | {_fmt(s['iou'])} | {_fmt(s['effectiveness'])} | "
                   f"{_fmt(s['preservation'])} | " + " | ".join(cells) + " |")
    return out


def _md_composition(report: dict) -> list[str]:
    null, own = report["composition"]["null_intervention"], report["composition"].get("model") or {}
    out = ["", "## Composition", "",
            "The SCM's null intervention (a correctness check, exact by construction): "
            f"{null['count']} rows, exact {_fmt(null['exact'])}, pixel error {_fmt(null['pixel_error'], 4)}.", "",
            f"The model's own, on {own.get('count', 0)} factual images: encoded and decoded at the "
            "factual classes with the most likely pixels, k times, against the factual image:", "",
            "| k | IoU | exact |", "| ---: | ---: | ---: |"]
    for k in own.get("iou", {}):
        out.append(f"| {k} | {_fmt(own['iou'][k])} | {_fmt(own['exact'][k])} |")
    return out


def _md_controls(report: dict, model: dict) -> list[str]:
    out = ["", "## Controls", "",
            "The same metrics for answer sets that know nothing, built from the same rows "
            "(intervened rows):", "",
            "| answers | rows | IoU | pixel error | effectiveness | preservation | read nothing |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    labels = {"model": "the model", "factual": "factual image unchanged", "blank": "blank image",
              "random": "random grid image"}
    sections = {"model": model, **report["controls"]}
    for name, label in labels.items():
        s = sections[name]["overall"]
        if s is not None:
            out.append(f"| {label} | {s['count']} | {_fmt(s['iou'])} | {_fmt(s['pixel_error'], 4)} | "
                       f"{_fmt(s['effectiveness'])} | {_fmt(s['preservation'])} | "
                       f"{_fmt(s['read_nothing'])} |")
    return out
