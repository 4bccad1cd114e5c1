"""What a run leaves behind for people: ``metrics.jsonl``, TensorBoard events and ``learning_curves.png``.

Only process 0 writes. On resume at step s, rows logged after s by the interrupted run are dropped first (and
TensorBoard is told to purge its events after s), so the history of a resumed run reads exactly like that of an
uninterrupted one. Rows up to s are never touched, and a run that does not resume never truncates anything:
``training/workdir.py`` moves an earlier history aside before a fresh start.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import jax

from resnet_jax.atomic import replace_atomically

METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "learning_curves.png"
TENSORBOARD_DIR = "tensorboard"


class MetricsLog:
    """Appends rows to ``metrics.jsonl`` and TensorBoard; ``resume_step`` (None for a run that starts at step 0)
    first drops the rows an interrupted run logged after it."""

    def __init__(self, workdir: str | Path, resume_step: int | None = None):
        self.workdir = Path(workdir)
        self.path = self.workdir / METRICS_FILE
        self.enabled = jax.process_index() == 0
        self.resume_step = resume_step
        self._tb = None
        if self.enabled:
            self.workdir.mkdir(parents=True, exist_ok=True)
            if resume_step is not None and self.path.exists():
                kept = [r for r in read_metrics(self.workdir) if r["step"] <= resume_step]
                text = "".join(json.dumps(r) + "\n" for r in kept)
                # replaced whole: rewritten in place, a full disk or a kill mid-write cut the rows to keep too
                replace_atomically(self.path, lambda partial: partial.write_text(text))

    def write(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        tb = self._writer()
        if tb is not None:
            for key, value in row.items():
                if key not in ("step", "epoch", "split") and isinstance(value, (int, float)):
                    tb.add_scalar(f"{row['split']}/{key}", value, row["step"])
            tb.flush()

    def _writer(self):
        if self._tb is None:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:  # TensorBoard events are a convenience; metrics.jsonl is the record
                self._tb = False
            else:
                # purge_step: TensorBoard hides the interrupted run's events after the resumed step
                purge = None if self.resume_step is None else self.resume_step + 1
                self._tb = SummaryWriter(str(self.workdir / TENSORBOARD_DIR), purge_step=purge)
        return self._tb or None

    def close(self) -> None:
        if self.enabled:
            plot_learning_curves(self.workdir)
        if self._tb:
            self._tb.close()


def read_metrics(workdir: str | Path) -> list[dict[str, Any]]:
    """The rows of ``metrics.jsonl``. An unreadable last line without its newline is a write cut short (a crash,
    a full disk): it is left out, and a resumed run rewrites the file without it. Any other unreadable line is an error
    naming the file and line, since it is not what this library writes."""
    path = Path(workdir) / METRICS_FILE
    if not path.exists():
        return []
    text = path.read_text()
    lines = text.splitlines()
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            if number == len(lines) and not text.endswith("\n"):
                break
            raise ValueError(f"{path}, line {number}, is not a JSON row ({err}); fix or delete that line (the "
                             f"checkpoints do not depend on it)") from None
    return rows


def plot_learning_curves(workdir: str | Path) -> Path | None:
    """Loss and accuracy against epoch for train, validation and (with ``model_ema``) the EMA's validation
    rows; returns the PNG path."""
    rows = read_metrics(workdir)
    if not rows:
        return None
    # A bare Figure draws off-screen without touching pyplot's global backend, so a notebook's inline plots
    # (or a user's GUI backend) keep working after a run.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3.8))
    axes = fig.subplots(1, 2)
    for split, style in (("train", "-"), ("val", "o-"), ("val_ema", "s--")):
        part = [r for r in rows if r["split"] == split]
        if not part:
            continue
        x = [r["epoch"] for r in part]
        axes[0].plot(x, [r["loss"] for r in part], style, label=split)
        axes[1].plot(x, [r["accuracy"] for r in part], style, label=split)
    losses = [r["loss"] for r in rows if math.isfinite(r["loss"])]
    if losses and min(losses) > 0:  # the first validation losses of a run can be 100x the rest: log keeps both
        axes[0].set_yscale("log")
    for ax, name in zip(axes, ("loss", "top-1 accuracy")):
        ax.set_xlabel("epoch")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    out = Path(workdir) / CURVES_FILE
    fig.savefig(out, dpi=100)
    return out
