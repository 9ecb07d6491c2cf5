"""`python -m omnitrain.data [hydra overrides]`: inspect a dataset, no training.

    python -m omnitrain.data
    python -m omnitrain.data data.dataset_dir=/path/to/llamafactory/data data.dataset=[a,b]
    python -m omnitrain.data data=demo_omni data.use_audio_in_video=true data.cutoff_len=512

Every sample is processed once (errors are listed, never fatal); a bad
configuration or dataset description exits with one line.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException

    from omnitrain.config import register_configs
    from omnitrain.data.config import quote_dataset_lists

    logging.basicConfig(level=logging.ERROR)  # errors are reported once, below
    register_configs()
    conf = Path(__file__).resolve().parents[1] / "conf"
    try:
        with initialize_config_dir(config_dir=str(conf), version_base=None):
            cfg = compose("config", overrides=quote_dataset_lists(argv))
    except HydraException as e:  # a typo in an override: its message, not a traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    cfg.data.on_error = "skip"  # inspection lists every error instead of stopping

    from omnitrain.data.summary import format_report, inspect_dataset
    from omnitrain.data.loader import build_dataset
    from omnitrain.data.processor import load_processor

    from omnitrain.errors import run_cli
    from omnitrain.models.family import build_family

    out = {}

    def body():
        processor = load_processor(cfg.model)
        dataset = build_dataset(cfg.data, build_family(cfg.model), processor)
        out["report"] = inspect_dataset(dataset, num_workers=cfg.data.num_workers)

    code = run_cli(body)
    if code:
        return code
    print(format_report(out["report"], cfg.data.cutoff_len))
    return 1 if out["report"]["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
