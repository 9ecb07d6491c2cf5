"""Per-step metrics: one JSON line per logged step, one readable stdout line,
and a progress bar with ETA when stdout is a terminal (none in logs and pipes)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path



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
        if progress and sys.stdout.isatty():
            self._bar = ProgressBar(sys.stdout, total_steps, start_step)

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

    def log_eval(self, row: dict) -> None:
        """A validation row ({step, eval_loss, eval_tokens}): metrics.jsonl, TensorBoard eval/loss, a console line."""
        if not self.enabled:
            return
        self._file.write(json.dumps(row, allow_nan=True) + "\n")
        if self._tb is not None:
            self._tb.add_scalar("eval/loss", float(row["eval_loss"]), row["step"])
        line = f"step {row['step']:>{len(str(self.total))}}/{self.total} | eval loss {row['eval_loss']:.4f} ({row['eval_tokens']} tokens)"
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
            self._bar = None
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


def format_duration(seconds: float) -> str:
    """1:02:03, 2:03 or 0:05."""
    s = int(round(max(0.0, seconds)))
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def progress_text(done: int, total: int, elapsed_s: float, start: int = 0, width: int = 24) -> str:
    """`[#########...............] 12/40 30% 0:24<0:56`: steps done of total, time
    so far < time left at this run's pace (steps before `start` came from a
    checkpoint and do not count for the pace)."""
    frac = done / total if total else 1.0
    filled = int(width * frac)
    ran = done - start
    eta = format_duration(elapsed_s / ran * (total - done)) if ran > 0 else "?"
    return f"[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {frac:.0%} {format_duration(elapsed_s)}<{eta}"


class ProgressBar:
    """One line redrawn in place on a terminal; log lines are written above it."""

    def __init__(self, stream, total: int, start: int = 0):
        import time

        self.stream, self.total, self.start, self.done = stream, total, start, start
        self._clock = time.perf_counter
        self._t0 = self._clock()
        self._draw()

    def _draw(self) -> None:
        self.stream.write("\r\033[K" + progress_text(self.done, self.total, self._clock() - self._t0, self.start))
        self.stream.flush()

    def update(self, n: int = 1) -> None:
        self.done += n
        self._draw()

    def write(self, line: str) -> None:
        self.stream.write("\r\033[K" + line + "\n")
        self._draw()

    def close(self) -> None:
        self.stream.write("\r\033[K")
        self.stream.flush()
