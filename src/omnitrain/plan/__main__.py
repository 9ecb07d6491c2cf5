"""`python -m omnitrain.plan [overrides] [--compare RUN_DIR]`: the planner.

    python -m omnitrain.plan model=<model> parallel=<layout>
    python -m omnitrain.plan model=<model> parallel=<layout> parallel.pp.layers=auto
    python -m omnitrain.plan model=<model> parallel=<layout> data=<data> train.global_batch_size=16
    python -m omnitrain.plan parallel=auto plan.world_size=8 plan.memory_gib=64
    python -m omnitrain.plan plan.tokens.image=1024 plan.tokens.text=300 ...   # explicit tokens, no data scan
    python -m omnitrain.plan plan.calibrate=true parallel=pp4_uniform          # time each layer type here, fit
    python -m omnitrain.plan --compare outputs/<run dir> plan.calibrate=true   # prediction beside the run's times

Composes the same config as `python -m omnitrain` (same overrides) and builds
the model on the meta device. Prints parameters per module, layer and stage;
then per stage FLOPs, activation and parameter+grad+optimizer memory after
TP/FSDP, predicted forward/backward time per micro-batch, the bottleneck
ratio (slowest / mean stage) and the schedule's predicted bubble. With
--compare, the run's own config (its config.yaml) is planned and printed
beside the per-stage times and bubble its metrics.jsonl measured.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    from omnitrain.errors import run_cli
    from omnitrain.plan import compose, report

    run_dir = None
    if "--compare" in argv:
        i = argv.index("--compare")
        if i + 1 >= len(argv):
            print("usage: python -m omnitrain.plan --compare <run dir> [overrides]", file=sys.stderr)
            return 2
        run_dir = argv[i + 1]
        argv = argv[:i] + argv[i + 2 :]

    def body():
        if run_dir is None:
            print(report(compose(argv)))
        else:
            from omnitrain.plan.compare import compare

            print(compare(run_dir, argv))

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
