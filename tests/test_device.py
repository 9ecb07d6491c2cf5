"""device.py is the only file that names a device type or a backend."""

import re
from pathlib import Path

import torch

from omnitrain import device

SRC = Path(__file__).resolve().parents[1] / "src" / "omnitrain"
NAMES = re.compile(r"""["'](cuda|npu|nccl|hccl|gloo|mps|xpu)["':]""")


def test_no_device_or_backend_names_outside_device_py():
    offenders = []
    for path in sorted(SRC.rglob("*.py")):
        if path.name == "device.py":
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if NAMES.search(line):
                offenders.append(f"{path.relative_to(SRC)}:{i}: {line.strip()}")
    assert not offenders, "route these through omnitrain.device:\n" + "\n".join(offenders)


def test_cpu_detection_and_backend():
    info = device.detect("cpu")
    assert info.type == "cpu" and info.backend == device.cpu_backend()
    assert device.backend_for(torch.device("cpu")) == info.backend
    auto = device.detect("auto")
    assert auto.backend == device.backend_for(auto)
    # accelerators: host tensors (loss sums, dp counters) go to gloo on the same groups
    for dev, lib in (("cuda", "nccl"), ("npu", "hccl")):
        spec = device.backend_for(device.DeviceInfo(dev, ""))
        assert spec == f"cpu:gloo,{dev}:{lib}"
        assert torch.distributed.Backend(spec) == spec  # a string torch's init_process_group parses


def test_bad_device_request_names_the_key():
    import pytest

    with pytest.raises(ValueError, match="train.device"):
        device.detect("tpu")


def test_rng_state_round_trip():
    dev = torch.device("cpu")
    state = device.rng_state(dev)
    a = torch.rand(3)
    device.set_rng_state(dev, state)
    assert torch.equal(a, torch.rand(3))


def test_compute_clock_counts_compute_not_waiting():
    """Stage times on CPU (one thread per worker) are the thread's CPU time: a
    worker waiting for a core, or sleeping, does not advance it."""
    import time

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        clock = device.compute_clock(torch.device("cpu"))
        t0 = clock()
        time.sleep(0.2)
        slept = clock() - t0
        a = torch.randn(256, 256)
        t0 = clock()
        for _ in range(50):
            a = torch.tanh(a @ a)
        worked = clock() - t0
        assert slept < 0.05 and worked > 0, (slept, worked)
        torch.set_num_threads(2)
        assert device.compute_clock(torch.device("cpu")) is time.perf_counter  # threads in a pool: wall time
    finally:
        torch.set_num_threads(before)
