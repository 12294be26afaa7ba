"""Tables of `bench-downstream`: mIoU mean ± std over training seeds per (method, N), ratios to the
oracle and to the colour-recovered ceiling, per-class IoU, and what mis-drawn samples cost."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..atomic import atomic_write_bytes
from .render import SHAPES

ORACLE, CEILING = "oracle", "ceiling"
TEST_SETS = ("plain", "hard")
# text after this line in the table file is hand-written (how the settings were chosen, history): kept
KEEP_BELOW = "<!-- hand-written below this line: bench-downstream keeps it -->"


def cell_scores(runs: list[dict], test: str) -> dict[tuple[str, int], list[float]]:
    out: dict[tuple[str, int], list[float]] = {}
    for r in runs:
        out.setdefault((r["method"], r["n"]), []).append(r[test]["miou"])
    return out


def mean_std(values: list[float]) -> tuple[float, float]:
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def summary(results: dict) -> dict:
    """{test: {method: {N: {mean, std, seeds, vs_oracle, vs_ceiling}}}}."""
    out: dict = {}
    for test in TEST_SETS:
        cells = cell_scores(results.get("runs", []), test)
        table: dict = {}
        for (method, n), values in cells.items():
            m, s = mean_std(values)
            row = {"mean": m, "std": s, "seeds": len(values)}
            for ref, name in ((ORACLE, "vs_oracle"), (CEILING, "vs_ceiling")):
                if (ref, n) in cells:
                    row[name] = m / float(np.mean(cells[(ref, n)]))
            table.setdefault(method, {})[n] = row
        out[test] = table
    return out


def per_class(results: dict, test: str, n: int) -> dict[str, dict[str, float]]:
    """Mean per-class IoU over seeds at one N (absent classes left out)."""
    rows: dict[str, dict[str, list[float]]] = {}
    for r in results.get("runs", []):
        if r["n"] != n:
            continue
        for name, v in r[test]["per_class_iou"].items():
            if v is not None:
                rows.setdefault(r["method"], {}).setdefault(name, []).append(v)
    return {m: {c: float(np.mean(v)) for c, v in d.items()} for m, d in rows.items()}


def markdown(results: dict, methods: list[str]) -> str:
    s = results.get("settings", {})
    summ = summary(results)
    sizes = sorted({r["n"] for r in results.get("runs", [])})
    ran = [r["method"] for r in results.get("runs", [])]  # a labelling run but not listed still gets its row
    order = [m for m in dict.fromkeys([*methods, "ceiling_clean", *ran]) if any(m in summ[t] for t in TEST_SETS)]
    lines = ["# Data that trains: segmenters trained on each labelling of the same generated images", "",
             "Made by `maskmill toyworld bench-downstream` (`maskmill/toyworld/bench_downstream.py`). Generated "
             "images follow the shapes-world run's plan (configs/shapes.yaml: prompts, seeds, SeeDiff and its "
             "filter); the first N accepted ones are labelled by each method and a SegFormer is trained on each "
             "labelling alone, then scored on rendered scenes with exact masks (`maskmill toyworld render-testset`: "
             "plain = like the micro model's training scenes; hard = 3-4 smaller, often touching objects on "
             "background textures never seen in training).", "",
             "Training labels: **oracle** = rendered scenes with exact masks holding the same prompted objects "
             "(\"real\" data, same count); **ceiling** = the generated images' truth recovered from their colours; "
             "**ceiling_clean** = the same without samples whose drawn shape is not the prompted one; **seediff** = "
             "the product (shapes config); **seediff_clip** = SeeDiff samples that pass the CLIP check "
             "(`filter.clip` with the micro CLIP: those it rejects are dropped and the next ones taken, same N); "
             "**seediff_clip_ignore** = the first N SeeDiff samples (the images of seediff) after the same check "
             "with `action: ignore` (the classes it flags set to 255, ignored in training); "
             "**cross** = raw cross-attention threshold (DAAM / DiffuMask style); "
             "**propagated** = self-attention-propagated map; **cross_x_propagated** = SA^k @ CA times cross "
             "(Dataset Diffusion style); **diffseg**, **diffcut** = the other extractors, default parameters.", "",
             f"Split `{s.get('split')}` ({s.get('n_test')} rendered scenes per test set); the same SegFormer "
             f"(config-initialised, {_size_text(s.get('size'))}; {s.get('steps')} steps, batch "
             f"{s.get('batch_size')}, lr {s.get('lr')}, crop scale {s.get('crop_scale')}) for every cell; mIoU "
             f"mean ± std over training seeds (count in brackets); '-' = not run.", ""]
    pool = results.get("pool", {})
    if pool:
        lines += [f"Generated pool: {pool['accepted']} accepted of {pool['generated']} generated; "
                  f"accepted samples with a prompted shape drawn as another (or missing): "
                  + ", ".join(f"{v} of the first {k}" for k, v in pool["misdrawn"].items()) + "."]
        if "clip_rejected" in pool:
            lines += ["The CLIP check rejects " + ", ".join(f"{v} of the first {k}" for k, v in
                                                           pool["clip_rejected"].items())
                      + f" ({pool['clip_rejected_total']} in all, {pool['clip_rejected_misdrawn']} of them mis-drawn; "
                      f"{pool['misdrawn_total']} mis-drawn in all)."]
        if "clip_ignored" in pool:
            lines += ["With `action: ignore` the same check keeps every sample and sets to 255 " + "; ".join(
                _ignored_text(v, f"the first {k}") for k, v in pool["clip_ignored"].items())
                + f"; {_ignored_text(pool['clip_ignored_total'], 'all')}."]
        lines.append("")
    for test in TEST_SETS:
        lines += [f"## {test} test scenes: mIoU", "", "| training labels | " + " | ".join(f"N={n}" for n in sizes)
                  + " |", "|---|" + "---|" * len(sizes)]
        for m in order:
            cells = summ[test].get(m, {})
            lines.append(f"| {m} | " + " | ".join(
                f"{cells[n]['mean']:.3f} ± {cells[n]['std']:.3f} ({cells[n]['seeds']})" if n in cells else "-"
                for n in sizes) + " |")
        lines += ["", f"Ratio of the mean to the oracle's / to the ceiling's ({test}):", "",
                  "| training labels | " + " | ".join(f"N={n}" for n in sizes) + " |", "|---|" + "---|" * len(sizes)]
        for m in order:
            cells = summ[test].get(m, {})
            lines.append(f"| {m} | " + " | ".join(
                f"{cells[n].get('vs_oracle', float('nan')):.3f} / {cells[n].get('vs_ceiling', float('nan')):.3f}"
                if n in cells else "-" for n in sizes) + " |")
        lines.append("")
    all_n = max([n for n in sizes if sum(1 for m in order if n in summ["hard"].get(m, {})) >= 4], default=None)
    if all_n is not None:
        names = ["background", *SHAPES]
        for test in TEST_SETS:
            pc = per_class(results, test, all_n)
            lines += [f"## Per-class IoU, {test} test scenes, N={all_n} (mean over seeds)", "",
                      "| training labels | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
            for m in order:
                if m in pc:
                    lines.append(f"| {m} | " + " | ".join(f"{pc[m].get(c, float('nan')):.3f}" for c in names) + " |")
            lines.append("")
    if "wall_seconds" in results:
        lines += [f"Wall time of the trainings and scoring (pool generation not included): "
                  f"{results['wall_seconds'] / 60:.1f} min on the shared 2-core CPU.", ""]
    return "\n".join(lines)


def _ignored_text(share: dict, which: str) -> str:
    return (f"{share['classes']} of the {share['of_classes']} prompted classes of {which} (in {share['samples']} "
            f"samples, {share['samples_misdrawn']} of them mis-drawn: {share['class_pixel_share']:.1%} of SeeDiff's "
            f"class pixels, {share['pixel_share']:.1%} of all pixels)")


def _size_text(size: dict | None) -> str:
    if not size:
        return "default size"
    return (f"MiT widths {tuple(size['hidden_sizes'])}, depths {tuple(size['depths'])}, strides "
            f"{tuple(size['strides'])}, decoder {size['decoder_hidden_size']}")


def hand_written(table: Path) -> str:
    """The table file's hand-written tail (from KEEP_BELOW on), or ''."""
    text = Path(table).read_text() if Path(table).is_file() else ""
    return text[text.index(KEEP_BELOW):] if KEEP_BELOW in text else ""


def write_report(results: dict, cfg) -> None:
    """The results JSON and the markdown table, each replaced atomically: a benchmark stopped mid-write
    resumes from the previous results file, never a truncated one."""
    Path(cfg.results).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(cfg.results, (json.dumps({**results, "summary": {t: {m: {str(n): v for n, v in d.items()}
                                                                             for m, d in tab.items()}
                                                                         for t, tab in summary(results).items()}},
                                                indent=1) + "\n").encode())
    Path(cfg.table).parent.mkdir(parents=True, exist_ok=True)
    tail = hand_written(cfg.table)
    atomic_write_bytes(cfg.table, (markdown(results, cfg.methods) + "\n" + (f"\n{tail}" if tail else "")).encode())
