"""`python -m omnitrain.generate`: text from a trained model, prompts built as in training.

    python -m omnitrain.generate MODEL --prompt "Describe it." --image cat.jpg [--max-new-tokens 64]
    python -m omnitrain.generate MODEL --data test.json --out predictions.jsonl [--nproc 2 --batch-size 4]

MODEL is a checkpoint of any layout (step dir, checkpoints/ or run dir) or an
HF folder. `--prompt` prints the answer. `--data` takes a LLaMA-Factory json
(sharegpt/messages or LLaVA format, media relative to the file): each
sample's last assistant turn is held out as the label and generated; one
JSON line per sample (`index`, `prompt`, `predict`, `label`) goes to --out.
Greedy by default; --do-sample with --temperature/--top-p/--top-k samples.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import List

from omnitrain.generate import cli, prompt_example

log = logging.getLogger("omnitrain.generate")


def data_examples(file: str, max_samples=None):
    """(examples ending with the user's turn, their held-out answers) of a LLaMA-Factory json."""
    from omnitrain.data.formats import DatasetSpec, parse_record, read_records

    spec = DatasetSpec(name=Path(file).name, file=Path(file).expanduser(), formatting="auto")
    records = read_records(spec)[:max_samples]
    examples, labels = [], []
    for i, r in enumerate(records):
        ex = parse_record(spec, i, r)
        labels.append(ex.turns[-1][1])
        ex.turns = ex.turns[:-1]
        examples.append(ex)
    return examples, labels


def _write_jsonl(path: Path, rows: List[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(path)


def main(argv: List[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m omnitrain.generate", description=__doc__.split("\n\n")[0])
    cli.add_model_args(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="the user's message")
    src.add_argument("--data", help="a LLaMA-Factory json: generate each sample's last answer")
    p.add_argument("--image", action="append", default=[], help="image file for --prompt (repeatable)")
    p.add_argument("--video", action="append", default=[], help="video file for --prompt (repeatable)")
    p.add_argument("--audio", action="append", default=[], help="audio file for --prompt (repeatable)")
    p.add_argument("--use-audio-in-video", action="store_true", help="--prompt: interleave the video's soundtrack")
    p.add_argument("--system", help="system prompt (default: the sample's, else the model's default)")
    p.add_argument("--max-samples", type=int, help="--data: the first N samples")
    p.add_argument("--out", default="generated_predictions.jsonl", help="--data: predictions file (jsonl)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    from omnitrain.errors import run_cli
    from omnitrain.generate import predict

    def body():
        if args.prompt is not None:
            examples = [prompt_example(args.prompt, args.image, args.video, args.audio, args.system, args.use_audio_in_video or None)]
            labels = None
        else:
            if args.image or args.video or args.audio:
                p.error("--image/--video/--audio go with --prompt; a --data file names its own media")
            examples, labels = data_examples(args.data, args.max_samples)
            if args.system is not None:
                for ex in examples:
                    ex.system = args.system
        results = predict(args.model, cli.load_kwargs(args), examples, cli.gen_options(args), batch_size=args.batch_size, nproc=args.nproc)
        if not cli.is_writer():
            return
        if labels is None:
            print(results[0]["text"], flush=True)
            return
        rows = [
            {"index": ex.index, "prompt": ex.turns[-1][1], "predict": r["text"], "label": label, "tokens": r["tokens"]}
            for ex, r, label in zip(examples, results, labels)
        ]
        _write_jsonl(Path(args.out), rows)
        log.info("wrote %d predictions to %s", len(rows), args.out)

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
