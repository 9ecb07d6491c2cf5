"""Per-step metrics: one JSON line per logged step, one readable stdout line,
and a progress bar on long runs."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

# Runs at least this long get a progress bar (on stderr, only on a terminal).
PROGRESS_MIN_STEPS = 50


class MetricsLogger:
    def __init__(
        self, run_dir: str | Path, total_steps: int, *, enabled: bool = True, progress: bool = True, start_step: int = 0,
        tensorboard: bool = False,
    ):
        self.enabled = enabled
        self.total = total_steps
        self.path = Path(run_dir) / "metrics.jsonl"
        self._file = None
        self._bar = None
        self._tb = None
        if not enabled:
            return
        if tensorboard:
            self._tb = tensorboard_writer(Path(run_dir) / "tensorboard", start_step)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        drop_rows_after(self.path, start_step)
        # Append: a resumed run continues the same file.
        self._file = open(self.path, "a", buffering=1)
        if progress and total_steps >= PROGRESS_MIN_STEPS and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, unit="step", dynamic_ncols=True, leave=False)

    def log(self, row: dict) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps(row, allow_nan=True) + "\n")
        if self._tb is not None:
            for key, v in row.items():
                if key != "step" and isinstance(v, (int, float)):
                    self._tb.add_scalar(f"train/{key}", float(v), row["step"])
                elif isinstance(v, list) and v and all(isinstance(x, (int, float)) for x in v):  # per stage
                    for i, x in enumerate(v):
                        self._tb.add_scalar(f"train/{key}/{i}", float(x), row["step"])
        line = format_row(row, self.total)
        if self._bar is not None:
            self._bar.write(line)
        else:
            print(line, flush=True)

    def advance(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        if self._file is not None:
            self._file.close()


def tensorboard_writer(log_dir: Path, start_step: int = 0):
    """A SummaryWriter on `log_dir`; a resumed run's writer purges events past its step."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:  # torch's writer needs the tensorboard package
        from omnitrain.config import ConfigError

        raise ConfigError(f"train.tensorboard=true needs the tensorboard package: pip install 'omnitrain[tb]' ({e})") from None
    log_dir.mkdir(parents=True, exist_ok=True)
    return SummaryWriter(str(log_dir), purge_step=start_step + 1 if start_step else None)


def drop_rows_after(path: Path, step: int) -> None:
    """Keep rows up to `step` (the checkpoint a run resumes from): the steps a
    killed run logged past it are run again and would appear twice."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)

    def before(line: str) -> bool:
        try:
            return json.loads(line).get("step", 0) <= step
        except ValueError:  # a line cut short by a kill
            return False

    keep = [ln if ln.endswith("\n") else ln + "\n" for ln in lines if ln.strip() and before(ln)]
    if len(keep) != len(lines):
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(keep))
        tmp.replace(path)


def format_row(row: dict, total: int) -> str:
    width = len(str(total))
    parts = [f"step {row['step']:>{width}}/{total}", f"loss {row['loss']:.4f}"]
    if row.get("skipped"):
        parts.append("SKIPPED (non-finite)")
    if math.isfinite(row.get("grad_norm", float("nan"))):
        parts.append(f"gnorm {row['grad_norm']:.3f}")
    parts.append(f"lr {row['lr']:.2e}")
    parts.append(f"{row['tokens_per_s']:,.0f} tok/s")
    parts.append(f"{row['step_time_s']:.2f} s")
    if row.get("mfu"):
        parts.append(f"mfu {row['mfu']:.1%}")
    if row.get("pad_frac_unpacked", 0) != row.get("pad_frac", 0):  # packed
        parts.append(f"pad {row['pad_frac']:.0%} (unpacked {row['pad_frac_unpacked']:.0%})")
    if "bubble" in row:
        parts.append(f"bubble {row['bubble']:.0%}")
    return " | ".join(parts)
