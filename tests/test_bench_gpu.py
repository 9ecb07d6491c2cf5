"""scripts/bench_gpu.py runs end to end on CPU (--smoke: tiny model, small
synthetic samples through the real data pipeline and training step) and
reports what it promises; the real measurement needs an accelerator."""

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_gpu.py"


def _load():
    spec = importlib.util.spec_from_file_location("bench_gpu", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_gpu_smoke(capsys):
    out = _load().main(["--smoke", "--peak-tflops", "1e-6"])  # a made-up peak: MFU must come out > 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [ln.split("=")[0] for ln in lines[-3:]] == ["tokens_per_s", "mfu", "peak_mem_gib"]
    assert out["tokens_per_s"] > 0 and out["mfu"] > 0 and out["peak_mem_gib"] > 0
    assert any(ln.startswith("step 1: ") for ln in lines)
    assert float(lines[-2].split("=")[1]) == pytest.approx(out["mfu"], rel=1e-3)
