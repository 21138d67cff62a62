"""Counting what every stage received, kept and dropped, and the funnel report built from those counts."""

from __future__ import annotations

import json
import numbers
from collections import Counter
from pathlib import Path

from ..formats.files import atomic_write_text, atomic_writer
from ..formats.plotting import subplots


# Reserved reasons: everything else a stage records is a drop reason.
INPUT = "input"
KEPT = "kept"

STAGE_ORDER = ("read", "parse", "images", "text", "relevance", "aggregation")


class Tally(Counter):
    """Counts keyed by `stage/unit/reason`; mergeable, JSON-serialisable and picklable."""

    def add(self, stage: str, unit: str, reason: str, n: int = 1) -> None:
        if n:
            self[f"{stage}/{unit}/{reason}"] += n

    def drop(self, stage: str, unit: str, reason: str, n: int = 1) -> None:
        if reason in (INPUT, KEPT):
            raise ValueError(f"{reason!r} is reserved and cannot be a drop reason")
        self.add(stage, unit, reason, n)

    def get_count(self, stage: str, unit: str, reason: str) -> int:
        return self.get(f"{stage}/{unit}/{reason}", 0)

    def drops(self, stage: str | None = None, unit: str | None = None) -> dict[str, int]:
        """Drop counts by reason, optionally restricted to one stage and unit."""
        out: Counter = Counter()
        for key, n in self.items():
            s, u, r = key.split("/", 2)
            if r in (INPUT, KEPT) or (stage is not None and s != stage) or (unit is not None and u != unit):
                continue
            out[r if stage is not None else f"{s}/{r}"] += n
        return dict(out)

    def to_json(self) -> str:
        return json.dumps(dict(sorted(self.items())), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Tally:
        return cls(json.loads(text))

    @classmethod
    def merge(cls, tallies) -> Tally:
        total = cls()
        for tally in tallies:
            total.update(tally)
        return total

    def rows(self) -> list[dict]:
        """One row per (stage, unit, reason), in pipeline order, inputs and kept first."""

        def order(row):
            stage_rank = STAGE_ORDER.index(row["stage"]) if row["stage"] in STAGE_ORDER else len(STAGE_ORDER)
            reason_rank = {INPUT: 0, KEPT: 1}.get(row["reason"], 2)
            return stage_rank, row["unit"], reason_rank, -row["count"], row["reason"]

        rows = []
        for key, n in self.items():
            stage, unit, reason = key.split("/", 2)
            rows.append({"stage": stage, "unit": unit, "reason": reason, "count": int(n)})
        return sorted(rows, key=order)


def funnel_markdown(tally: Tally) -> str:
    """The funnel as a markdown table: per stage and unit, what came in, what was kept and each drop reason."""
    lines = ["| stage | unit | reason | count | share of input |", "|---|---|---|---:|---:|"]
    for row in tally.rows():
        total = tally.get_count(row["stage"], row["unit"], INPUT)
        share = f"{100.0 * row['count'] / total:.1f}%" if total and row["reason"] != INPUT else ""
        reason = row["reason"] if row["reason"] in (INPUT, KEPT) else f"dropped: {row['reason']}"
        lines.append(f"| {row['stage']} | {row['unit']} | {reason} | {row['count']} | {share} |")
    return "\n".join(lines) + "\n"


def funnel_chart(tally: Tally, path: str | Path, title: str = "Curation funnel") -> None:
    """Horizontal bar chart of kept and dropped counts per stage and reason, saved as a PNG."""
    rows = [row for row in tally.rows() if row["reason"] != INPUT]
    labels = [f"{r['stage']} ({r['unit']}): {r['reason']}" for r in rows][::-1]
    counts = [r["count"] for r in rows][::-1]
    colors = ["tab:green" if r["reason"] == KEPT else "tab:red" for r in rows][::-1]
    fig, ax = subplots(figsize=(10, max(3.0, 0.32 * len(rows) + 1.2)))
    ax.barh(range(len(rows)), counts, color=colors)
    ax.set_yticks(range(len(rows)), labels, fontsize=8)
    ax.set_xscale("symlog")
    ax.set_xlabel("count (green: kept, red: dropped)")
    ax.set_title(title)
    for i, n in enumerate(counts):
        ax.text(n, i, f" {n}", va="center", fontsize=7)
    fig.tight_layout()
    with atomic_writer(path) as handle:
        fig.savefig(handle, format="png", dpi=110)


def check_tally(tally) -> None:
    """A funnel report needs a `Tally` of `stage/unit/reason` keys and non-negative integer counts."""
    if not isinstance(tally, Counter):
        raise TypeError(f"tally must be a Tally (a Counter of 'stage/unit/reason' keys), got {type(tally).__name__}.")
    for key, count in tally.items():
        if not isinstance(key, str) or key.count("/") < 2:
            raise ValueError(f"tally key {key!r} is not of the form 'stage/unit/reason'.")
        if isinstance(count, bool) or not isinstance(count, numbers.Integral) or count < 0:
            raise ValueError(f"tally count of {key!r} must be a non-negative integer, got {count!r}.")


def write_funnel_report(tally: Tally, output_dir: str | Path) -> dict[str, Path]:
    """Writes `funnel.json`, `funnel.md` and `funnel.png` into `output_dir` atomically (each under a temporary name,
    synced, renamed) and returns their paths; the tally is checked before anything is written."""
    check_tally(tally)
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise ValueError(f"output_dir {str(output_dir)!r} is an existing file, expected a folder.")
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": output_dir / "funnel.json",
        "markdown": output_dir / "funnel.md",
        "png": output_dir / "funnel.png",
    }
    # Each file is written atomically, the JSON (what `load_funnel` and reruns read) last.
    funnel_chart(tally, paths["png"])
    atomic_write_text(paths["markdown"], funnel_markdown(tally))
    atomic_write_text(paths["json"], json.dumps({"rows": tally.rows()}, indent=2) + "\n")
    return paths


def load_funnel(output_dir: str | Path) -> Tally:
    """Reads back the tally written by `write_funnel_report`."""
    rows = json.loads((Path(output_dir) / "funnel.json").read_text())["rows"]
    tally = Tally()
    for row in rows:
        tally.add(row["stage"], row["unit"], row["reason"], row["count"])
    return tally


__all__ = ["INPUT", "KEPT", "Tally", "funnel_markdown", "load_funnel", "write_funnel_report"]
