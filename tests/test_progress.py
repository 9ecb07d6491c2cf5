"""The progress bar: pure formatting, and no bar unless stdout is a terminal."""

from __future__ import annotations

import io

from omnitrain.train import metrics
from omnitrain.train.metrics import MetricsLogger, ProgressBar, format_duration, progress_text


def test_progress_text_and_eta():
    assert format_duration(5) == "0:05" and format_duration(125) == "2:05" and format_duration(3723) == "1:02:03"
    assert progress_text(0, 40, 0.0) == "[........................] 0/40 0% 0:00<?"
    # 10 of 40 steps in 20 s: 30 left at 2 s each
    assert progress_text(10, 40, 20.0, width=8) == "[##......] 10/40 25% 0:20<1:00"
    # resumed at step 30: the pace counts only this run's 5 steps
    assert progress_text(35, 40, 10.0, start=30, width=8) == "[#######.] 35/40 88% 0:10<0:10"
    assert progress_text(40, 40, 80.0, width=4) == "[####] 40/40 100% 1:20<0:00"


def test_bar_only_on_a_terminal(tmp_path, monkeypatch):
    monkeypatch.setattr(metrics.sys.stdout, "isatty", lambda: False, raising=False)
    logger = MetricsLogger(tmp_path, 3, progress=True)
    assert logger._bar is None
    logger.close()
    tty = io.StringIO()
    tty.isatty = lambda: True
    monkeypatch.setattr(metrics.sys, "stdout", tty)
    logger = MetricsLogger(tmp_path / "b", 3, progress=True)
    assert isinstance(logger._bar, ProgressBar)
    logger.log({"step": 1, "loss": 1.0, "grad_norm": 0.5, "lr": 1e-3, "tokens_per_s": 10.0, "step_time_s": 0.1})
    logger.advance()
    logger.close()
    out = tty.getvalue()
    assert "step 1/3 | loss 1.0000" in out and "1/3 33%" in out and out.endswith("\r\033[K")
