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


def stage_plan(merge=False, head=False, pre=(), post=(), **layers):
    """A StagePlan for tests: module=(lo, hi) layer ranges; merge / head place
    the LLM's pre / post parts, `pre` / `post` an encoder's."""
    from omnitrain.parallel.layout import StagePlan

    pre = set(pre) | ({"llm"} if merge else set())
    post = set(post) | ({"llm"} if head else set())
    return StagePlan(0, 0, 1, {m: range(*r) for m, r in layers.items()}, frozenset(pre), frozenset(post))


# The default Omni thinker at 4 blocks per module (widths unchanged), for tests
# whose subject is not the real depths (training-loop behaviour, sweeps).
OMNI_SMALL = [
    "model.config.vision_config.depth=4", "model.config.vision_config.fullatt_block_indexes=[1,3]",
    "model.config.audio_config.encoder_layers=4", "model.config.text_config.num_hidden_layers=4",
]
