"""`python -m omnitrain.eval`: benchmark scores of a trained model.

    python -m omnitrain.eval MODEL --bench ai2d=AI2D_TEST.tsv --bench chartqa=ChartQA_TEST.tsv \\
        --bench docvqa=DocVQA_VAL.tsv --bench mmmu=MMMU_DEV_VAL.tsv --out eval_out [--nproc 4 --batch-size 8]

MODEL is a checkpoint of any layout or an HF folder (as for
`omnitrain.generate`, whose generation options apply; greedy by default).
Files are VLMEvalKit's TSVs. Metrics: accuracy of the option letter (ai2d,
mmmu), relaxed accuracy (chartqa), ANLS (docvqa). Writes OUT/scores.csv and
OUT/predictions.jsonl.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import List

from omnitrain.generate import cli


def parse_benches(specs: List[str]) -> dict:
    from omnitrain.eval.bench import EvalError, benchmark

    out = {}
    for spec in specs:
        name, eq, path = spec.partition("=")
        if not eq or not path:
            raise EvalError(f"--bench {spec}: use NAME=FILE.tsv, NAME one of ai2d, chartqa, docvqa, mmmu")
        b = benchmark(name)
        if b.name in out:
            raise EvalError(f"--bench {b.name} given twice")
        out[b.name] = path
    return out


def main(argv: List[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m omnitrain.eval", description=__doc__.split("\n\n")[0])
    cli.add_model_args(p)
    p.add_argument("--bench", action="append", default=[], metavar="NAME=FILE", help="a benchmark and its TSV (repeatable)")
    p.add_argument("--out", default="eval_out", help="folder for scores.csv and predictions.jsonl")
    p.add_argument("--limit", type=int, help="the first N questions of each benchmark")
    p.set_defaults(max_new_tokens=32)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    from omnitrain.errors import run_cli
    from omnitrain.eval import evaluate

    def body():
        rows = evaluate(args.model, parse_benches(args.bench), args.out, cli.load_kwargs(args), cli.gen_options(args),
                        batch_size=args.batch_size, nproc=args.nproc, limit=args.limit)
        if cli.is_writer():
            for r in rows:
                if r["category"] == "all":
                    print(f"{r['bench']:<8} {r['metric']:<17} {r['score']:.4f}  (n={r['n']})", flush=True)

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
