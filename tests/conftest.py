import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))

from omnitrain.config import register_configs  # noqa: E402

CONF = str(TESTS.parent / "src" / "omnitrain" / "conf")
register_configs()


def compose_cfg(overrides=(), output_dir=None):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=CONF, version_base=None):
        cfg = compose("config", overrides=list(overrides))
    if output_dir is not None:
        from omegaconf import open_dict

        with open_dict(cfg):
            cfg.train.output_dir = str(output_dir)
    return cfg


@pytest.fixture
def compose():
    return compose_cfg
