"""Every config composes; typos and wrong types fail naming the key."""

import subprocess
import sys
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError, ValidationError

from conftest import CONF, compose_cfg
from omnitrain.config import ConfigError
from omnitrain.parallel.context import check_layout

GROUPS = sorted(p.name for p in Path(CONF).iterdir() if p.is_dir())


def _options():
    for group in GROUPS:
        for f in sorted((Path(CONF) / group).glob("*.yaml")):
            yield group, f.stem


# Layouts written for another family's modules or depths, or for a batch
# larger than the default one (1F1B needs a micro-batch per stage).
WITH = {
    "vl7b_pp2": ["model=qwen25_vl"],
    "vl7b_pp4": ["model=qwen25_vl"],
    "vl32b_pp8_tp2": ["model=qwen25_vl_32b", "train.global_batch_size=8"],
    "vl72b_pp8_tp2": ["model=qwen25_vl_72b", "train.global_batch_size=8"],
    "pp4_tp2_hetero": ["train.global_batch_size=8"],
    # the planner's presets, on explicit token counts (no data scan)
    "pp4_auto": ["plan.tokens.image=16", "plan.tokens.audio=50", "plan.tokens.text=60"],
    "auto": ["plan.world_size=4", "plan.tokens.image=16", "plan.tokens.audio=50", "plan.tokens.text=60"],
    "omni30b_pp2_fsdp8": ["model=qwen3_omni_30b_a3b", "train.global_batch_size=16"],
    "omni30b_pp2_ep8": ["model=qwen3_omni_30b_a3b", "train.global_batch_size=16"],
}


@pytest.mark.parametrize("group,option", list(_options()))
def test_every_yaml_composes(group, option):
    cfg = compose_cfg([f"{group}={option}", *WITH.get(option, [])])
    assert cfg.train.steps >= 1
    if group == "parallel":
        plans = check_layout(cfg)
        assert len(plans) == cfg.parallel.pp.size * cfg.parallel.pp.virtual_stages
        assert not isinstance(cfg.parallel.pp.layers, str)  # auto was resolved


def test_unknown_key_fails_naming_it():
    with pytest.raises((ConfigCompositionException, ConfigKeyError)) as e:
        compose_cfg(["train.stpes=3"])
    assert "stpes" in str(e.value) + str(e.value.__cause__)


def test_wrong_type_fails_naming_key():
    with pytest.raises((ConfigCompositionException, ValidationError)) as e:
        compose_cfg(["train.steps=many"])
    assert "steps" in str(e.value) + str(e.value.__cause__)


def test_unknown_model_config_key_fails():
    from hydra.utils import instantiate

    cfg = compose_cfg(["+model.config.hiden_size=3"])
    with pytest.raises(Exception) as e:
        instantiate(cfg.model, _convert_="all")
    assert "hiden_size" in str(e.value)


def test_cross_group_rule_names_keys():
    cfg = compose_cfg(["train.global_batch_size=3", "train.micro_batch_size=2"])
    with pytest.raises(ConfigError, match="train.global_batch_size=3"):
        check_layout(cfg)


def test_cli_typo_and_cfg_job(tmp_path):
    bad = subprocess.run(
        [sys.executable, "-m", "omnitrain", "train.stpes=3"], capture_output=True, text=True, cwd=tmp_path, timeout=120
    )
    assert bad.returncode != 0
    assert "stpes" in bad.stderr
    job = subprocess.run(
        [sys.executable, "-m", "omnitrain", "--cfg", "job", "parallel=pp4_hetero"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert job.returncode == 0, job.stderr
    assert "llm:" in job.stdout and "- 12" in job.stdout
