"""``fedortho report <sweep-dir>``: one results table (Markdown and CSV) and plots.

Cells that differ only in ``seed`` form a group; each row shows mean ± std over its seeds
(sample standard deviation; 0 for a single seed) of the final and best test accuracy, the
epsilon spent and the wall time, and of the optional metrics some cells recorded (from the
summary, or from the last round that recorded them). Only cells of the grid the sweep last ran with are counted
(older cells left in the folder are named, not mixed in); damaged cells are named with the
reason they were left out.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedortho.config import ConfigError
from fedortho.sweep import RUN, STATUS, Sweep, cell_status, value_text

METRICS = (("final accuracy", "final-accuracy", 4), ("best accuracy", "best-accuracy", 4),
           ("epsilon spent", "epsilon-spent", 2), ("wall time (s)", "wall-seconds", 0))
# Shown when some cell recorded them (older runs and non-private runs lack some).
OPTIONAL_METRICS = (("zero-shot accuracy", "zero-shot-accuracy", 4), ("user epsilon spent", "user-epsilon-spent", 2),
                    ("noise multiplier", "noise-multiplier", 3),
                    ("clipped fraction", "clipped-fraction", 3), ("LoRA grad norm", "lora-grad-norm", 3),
                    ("head grad norm", "head-grad-norm", 3))
# Read from the last round that recorded them (user-level DP moves its clip from round to round).
LAST_ROUND_METRICS = (("user noise multiplier", "user-noise-multiplier", 3), ("last update clip", "update-clip", 3))


@dataclass
class Group:
    values: dict[str, Any]
    settings: dict[str, Any] = field(default_factory=dict)  # the run config of its cells (base + values)
    summaries: list[dict] = field(default_factory=list)
    curves: list[list[dict]] = field(default_factory=list)


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise TypeError(f"not a number: {value!r}")
    return float(value)  # summary.json writes infinities as the string "inf"


@dataclass
class Cells:
    groups: list[Group]
    failed: list[tuple[str, str]]       # (cell, its error)
    unreadable: list[tuple[str, str]]   # (cell, why it was left out)
    outside: list[str] = field(default_factory=list)  # cells of an earlier grid, left out


def current_cell_names(sweep_dir: Path) -> set[str] | None:
    """The cells of the grid the sweep last ran with (its ``sweep.json``); None if unknown."""
    try:
        spec = json.loads((sweep_dir / "sweep.json").read_text())
        sweep = Sweep(name=str(spec["name"]), out=sweep_dir, base=dict(spec["base"]),
                      grid={k: list(v) for k, v in spec["grid"].items()})
        return {cell.name for cell in sweep.cells()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError, ConfigError):
        return None


def _failure(folder: Path) -> str:
    try:
        return str(json.loads((folder / STATUS).read_text()).get("error", ""))
    except (OSError, ValueError, AttributeError):
        return "(no readable error)"


def _read_cell(folder: Path) -> tuple[dict, dict, dict, list[dict]]:
    """(grid values, settings, summary, metrics rows) of a finished cell; raises on anything damaged."""
    cell = json.loads((folder / "cell.json").read_text())
    values, settings = cell["values"], cell.get("settings", {})
    summary = json.loads((folder / RUN / "summary.json").read_text())
    for _, key, _ in METRICS:
        _number(summary[key])
    curve = [json.loads(line) for line in (folder / RUN / "metrics.jsonl").read_text().splitlines() if line.strip()]
    if not isinstance(values, dict) or not isinstance(settings, dict) or not all(isinstance(row, dict) for row in curve):
        raise ValueError("unexpected layout")
    rounds = [row.get("round") for row in curve]
    if rounds != list(range(len(rounds))):  # e.g. two writers appended to one folder
        shown = ", ".join(map(str, rounds[:12])) + (", ..." if len(rounds) > 12 else "")
        raise ValueError(f"metrics.jsonl is not one row per round from 0 (rounds {shown})")
    return values, settings, summary, curve


def load_cells(sweep_dir: Path) -> Cells:
    """Every cell folder of ``sweep_dir``: finished ones grouped over seeds, failed ones with
    their error, damaged ones left out with the reason (one bad cell never stops a report)."""
    groups: dict[str, Group] = {}
    failed, unreadable, outside = [], [], []
    current = current_cell_names(sweep_dir)
    for folder in sorted(p for p in sweep_dir.iterdir() if (p / "cell.json").is_file()):
        if current is not None and folder.name not in current:
            outside.append(folder.name)
            continue
        status = cell_status(folder)
        if status != "done":
            if status == "failed":
                failed.append((folder.name, _failure(folder)))
            continue
        try:
            values, settings, summary, curve = _read_cell(folder)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            unreadable.append((folder.name, f"{type(exc).__name__}: {exc}"))
            continue
        key_values = {k: v for k, v in values.items() if k != "seed"}
        key = json.dumps(key_values, sort_keys=True, default=str)
        group = groups.setdefault(key, Group(key_values, {k: v for k, v in settings.items() if k != "seed"}))
        group.summaries.append(summary)
        group.curves.append(curve)
    return Cells(list(groups.values()), failed, unreadable, outside)


def _mean_std(values: list[float]) -> tuple[float, float]:
    if any(math.isinf(v) for v in values):
        return math.inf, 0.0
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _fmt(mean: float, std: float, digits: int) -> str:
    if math.isinf(mean):
        return "inf"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def grid_keys(groups: list[Group]) -> list[str]:
    """Every grid key of any group, in first-seen order (cells of an older grid may lack some)."""
    return list(dict.fromkeys(k for g in groups for k in g.values))


def _optional_value(summary: dict, key: str) -> float | None:
    value = summary.get(key)
    return None if value is None or isinstance(value, bool) or not isinstance(value, (int, float)) else float(value)


def _last_recorded(curve: list[dict], key: str) -> float | None:
    return next((v for row in reversed(curve) if (v := _optional_value(row, key)) is not None), None)


def table_rows(groups: list[Group]) -> tuple[list[str], list[list[str]]]:
    keys = grid_keys(groups)
    optional = [m for m in OPTIONAL_METRICS
                if any(_optional_value(s, m[1]) is not None for g in groups for s in g.summaries)]
    last_round = [m for m in LAST_ROUND_METRICS if any(_last_recorded(c, m[1]) is not None
                                                           for g in groups for c in g.curves)]
    header = keys + ["seeds"] + [name for name, _, _ in METRICS + tuple(optional) + tuple(last_round)]
    rows = []
    for group in groups:
        row = [value_text(group.values[k]) if k in group.values else "–" for k in keys] + [str(len(group.summaries))]
        for _, key, digits in METRICS:
            row.append(_fmt(*_mean_std([_number(s[key]) for s in group.summaries]), digits))
        recorded = [(digits, [_optional_value(s, key) for s in group.summaries]) for _, key, digits in optional]
        recorded += [(digits, [_last_recorded(c, key) for c in group.curves]) for _, key, digits in last_round]
        for digits, values in recorded:
            present = [v for v in values if v is not None]
            row.append(_fmt(*_mean_std(present), digits) if present else "–")
        rows.append(row)
    return header, rows


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _epsilon_position(eps: float, finite: list[float]) -> float:
    return max(finite, default=0.0) * 1.5 + 1.0 if math.isinf(eps) else eps


def budget_axis(groups: list[Group], budget: str) -> tuple[dict[int, float], list[str]] | None:
    """Where each group sits on a privacy-budget axis (``epsilon`` or ``user-epsilon``, read
    from its run settings) and the grid keys that tell its line apart; None when the grid does
    not vary the budget on its own. The budget is varied on its own by a grid key of that name,
    or by a bundle key whose labels and budgets correspond one to one (``user-privacy`` =
    ``user-eps2``, ...); a bundle that also varies other settings at one budget (two clips at
    epsilon 6) would draw two points at one x on a line, so it gets no plot."""
    try:
        at = {i: _number(g.settings[budget]) for i, g in enumerate(groups)}
    except (KeyError, TypeError, ValueError):
        return None
    if len(set(at.values())) < 2:
        return None
    keys = grid_keys(groups)
    if budget in keys:
        axis_keys = [budget]
    else:
        def one_to_one(key: str) -> bool:
            pairs = {(value_text(g.values.get(key, "–")), at[i]) for i, g in enumerate(groups)}
            return len(pairs) == len({v for v, _ in pairs}) == len({b for _, b in pairs})
        axis_keys = [k for k in keys if one_to_one(k)]
        if not axis_keys:
            return None
    return at, [k for k in keys if k not in axis_keys]


def _population_note(groups: list[Group], budget: str) -> str:
    """A user-level epsilon for a simulated population (noise-cohort-size) says so on its axis."""
    cohorts = {g.settings.get("noise-cohort-size", 0) for g in groups}
    if budget != "user-epsilon" or cohorts == {0}:
        return ""
    if len(cohorts) == 1:
        return f" (noise sized for cohorts of {cohorts.pop():g}: a simulated population)"
    return " (some cells for a simulated population: see noise-cohort-size)"


def plot(groups: list[Group], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []

    def label(g: Group, keys) -> str:
        return ", ".join(f"{k}={value_text(g.values[k])}" for k in keys if k in g.values) or "all"

    for budget, name in (("epsilon", "accuracy_vs_epsilon.png"), ("user-epsilon", "accuracy_vs_user_epsilon.png")):
        axis = budget_axis(groups, budget)
        if axis is None:
            continue
        at, legend_keys = axis
        finite = sorted({eps for eps in at.values() if math.isfinite(eps)})
        series: dict[str, list] = {}
        for i, g in enumerate(groups):
            mean, std = _mean_std([_number(s["final-accuracy"]) for s in g.summaries])
            series.setdefault(label(g, legend_keys), []).append((_epsilon_position(at[i], finite), mean, std))
        fig, ax = plt.subplots(figsize=(6, 4) if len(series) <= MAX_LINES_PER_PANEL else (8.5, 4.5))
        for i, (line, points) in enumerate(series.items()):
            xs, ms, ss = zip(*sorted(points))
            ax.errorbar(xs, ms, yerr=ss, marker="o", capsize=3, label=line, **_line_style(i))
        has_inf = any(math.isinf(eps) for eps in at.values())
        ticks = finite + ([_epsilon_position(math.inf, finite)] if has_inf else [])
        ax.set_xticks(ticks, [f"{t:g}" for t in finite] + (["inf"] if has_inf else []))
        ax.set_xlabel(budget + _population_note(groups, budget))
        ax.set_ylabel("final test accuracy (mean ± std over seeds)")
        _legend(ax, len(series), fontsize=8)
        fig.tight_layout()
        paths.append(out / name)
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
    for metric, ylabel, name in (("test-accuracy", "test accuracy", "accuracy_vs_round.png"),
                                 ("epsilon", "epsilon spent (max over clients)", "epsilon_vs_round.png"),
                                 ("clipped-fraction", "share of per-sample gradients clipped", "clipped_vs_round.png"),
                                 ("lora-grad-norm", "median per-sample LoRA gradient norm", "lora_norm_vs_round.png")):
        having = [g for g in groups if any(metric in row for c in g.curves for row in c)]
        if metric not in ("test-accuracy", "epsilon") and not having:
            continue
        panels = _panels(groups if metric in ("test-accuracy", "epsilon") else having)
        most = max(len(members) for _, members, _ in panels)
        crowded = most if most > MAX_LINES_PER_PANEL else 0
        width = (6 if len(panels) == 1 else 4.2 * len(panels)) + (2.5 if crowded else 0)
        fig, axes = plt.subplots(1, len(panels), figsize=(width, 4), sharey=True, squeeze=False)
        for ax, (title, members, shown) in zip(axes[0], panels):
            for i, g in enumerate(members):
                by_round: dict[int, list[float]] = {}
                for curve in g.curves:
                    for row in curve:
                        value = row.get(metric)
                        if value is not None and not isinstance(value, str) and math.isfinite(value):
                            by_round.setdefault(row["round"], []).append(value)
                if by_round:
                    rounds = sorted(by_round)
                    ax.plot(rounds, [statistics.fmean(by_round[r]) for r in rounds], marker=".",
                            label=label(g, shown), **_line_style(i))
            if metric == "test-accuracy":
                _baselines(ax, members)
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("round")
            if ax.lines and not crowded:
                ax.legend(fontsize=7)
        drawn = [ax for ax in axes[0] if ax.lines]
        if crowded and drawn:  # one legend beside the panels: they share their lines' labels
            _legend(drawn[-1], crowded, fontsize=7)
        axes[0][0].set_ylabel(ylabel)
        fig.tight_layout()
        paths.append(out / name)
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
    return paths


MAX_LINES_PER_PANEL = 6
LINE_STYLES = ("-", "--", ":", "-.")


def _line_style(i: int) -> dict[str, str]:
    """The i-th line's colour and dash: matplotlib's ten colours, then the same colours dashed,
    so that an eleventh line never repeats the first's look."""
    return {"color": f"C{i % 10}", "linestyle": LINE_STYLES[i // 10 % len(LINE_STYLES)]}


def _legend(ax, lines: int, fontsize: int) -> None:
    """Inside the axes for a few lines; beside them for many, where it would cover the data."""
    if lines <= MAX_LINES_PER_PANEL:
        ax.legend(fontsize=fontsize)
    else:
        ax.legend(fontsize=fontsize, loc="center left", bbox_to_anchor=(1.02, 0.5))


def _panels(groups: list[Group]) -> list[tuple[str, list[Group], list[str]]]:
    """(title, groups, keys in the legend) per panel: one panel, or -- when more groups than
    MAX_LINES_PER_PANEL would share it -- one panel per value of the first grid key that varies."""
    keys = grid_keys(groups)
    varying = [k for k in keys if len({value_text(g.values.get(k, "–")) for g in groups}) > 1]
    if len(groups) <= MAX_LINES_PER_PANEL or len(varying) < 2:
        return [("", groups, keys)]
    split = varying[0]
    by_value: dict[str, list[Group]] = {}
    for g in groups:
        by_value.setdefault(value_text(g.values.get(split, "–")), []).append(g)
    return [(f"{split}={value}", members, [k for k in keys if k != split]) for value, members in by_value.items()]


def _baselines(ax, groups: list[Group]) -> None:
    """Dashed lines at the accuracy a run gets without training: the zero-shot head and the
    majority class (when the cells recorded them)."""
    for key, name, style in (("zero-shot-accuracy", "zero-shot head", "--"), ("majority-rate", "majority class", ":")):
        values = [v for g in groups for s in g.summaries if (v := _optional_value(s, key)) is not None]
        if values:
            ax.axhline(statistics.fmean(values), color="gray", linestyle=style, linewidth=1, label=name)


def report(sweep_dir: str | Path, echo=print) -> str:
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"no sweep folder {sweep_dir}")
    cells = load_cells(sweep_dir)
    groups = cells.groups
    header, rows = table_rows(groups)
    text = markdown(header, rows) if rows else "No finished cells yet.\n"
    if cells.failed:
        text += "\nFailed cells:\n\n" + "".join(f"- {name}: {error}\n" for name, error in cells.failed)
    if cells.unreadable:
        text += "\nLeft out, unreadable:\n\n" + "".join(f"- {name}: {why}\n" for name, why in cells.unreadable)
    if cells.outside:
        text += (f"\nLeft out, not in the sweep's current grid: {len(cells.outside)} cells "
                 f"({', '.join(cells.outside[:3])}{', ...' if len(cells.outside) > 3 else ''})\n")
    (sweep_dir / "results.md").write_text(text)
    with open(sweep_dir / "results.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    if groups:
        plot(groups, sweep_dir)
    echo(text.rstrip())
    return text
