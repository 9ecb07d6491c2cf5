"""`python -m omnitrain.data` inspects a dataset; every data config composes."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from data_fixtures.helpers import REPO, chat, demo_dir, write_dataset

CONF = REPO / "src" / "omnitrain" / "conf"


def _run(*args):
    env = {"PYTHONPATH": str(REPO / "src"), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    import os

    env = {**os.environ, **env}
    return subprocess.run([sys.executable, "-m", "omnitrain.data", *args], capture_output=True, text=True, env=env, timeout=300)


def test_inspect_reports_counts_and_errors(tmp_path):
    shutil.copy(demo_dir() / "mllm_demo_data" / "2.wav", tmp_path / "2.wav")
    samples = [
        {"messages": chat("<audio>What?", "A cough."), "audios": ["2.wav"]},
        {"messages": chat("<audio>What?", "Gone."), "audios": ["missing.wav"]},
        {"messages": chat("Hello", "Hi.")},
    ]
    write_dataset(tmp_path, samples)
    r = _run(f"data.dataset_dir={tmp_path}", "data.dataset=ds")
    out = r.stdout
    assert r.returncode == 1, r.stderr  # errors found
    assert "ds: audio_samples=1" in out and "text_only=1" in out
    assert "tokens per sample" in out
    assert "missing_file=1" in out and "sample 1" in out and "missing.wav" in out
    assert "Traceback" not in r.stderr


def test_inspect_bad_config_is_one_line(capsys):
    from omnitrain.data.__main__ import main

    assert main(["data.dataset=nope"]) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "unknown dataset 'nope'" in err


@pytest.mark.parametrize("name", sorted(p.stem for p in (CONF / "data").glob("*.yaml")))
def test_data_configs_compose(name):
    from hydra import compose, initialize_config_dir

    from omnitrain.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        cfg = compose("config", overrides=[f"data={name}"])
    assert cfg.data.name == name
    assert cfg.data.on_error in ("raise", "skip")


def test_dataset_comma_list_like_llamafactory():
    from omnitrain.data.config import quote_dataset_lists

    assert quote_dataset_lists(["data.dataset=a,b", "x=1"]) == ["data.dataset='a,b'", "x=1"]
    assert quote_dataset_lists(["data.dataset=[a,b]"]) == ["data.dataset=[a,b]"]
    assert quote_dataset_lists(["-m", "data.dataset=a,b"]) == ["-m", "data.dataset=a,b"]  # a sweep stays a sweep
