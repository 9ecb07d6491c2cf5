"""Load time of an HF folder: omnitrain's meta build + `materialize` (each
tensor read straight from the safetensors files into the module, no random
init first) against transformers' `from_pretrained` of the same folder, in
one process; and the bytes each rank of a 4-stage pipeline reads.

    python scripts/bench_load.py [--small] [--dtype bf16|fp32] [--dir DIR] [--repeats 2]

Writes a thinker folder of Qwen2.5-Omni-3B's published shapes
(conf/model/qwen25_omni_3b: 4.70 B parameters, untied head; random bf16
weights tiled from one random pool, in 2 GB shards, ~8.8 GiB; reused when
DIR already holds it) or, with --small, of the tiny qwen25_omni (real depths,
tiny widths). Both sides load the whole model in `--dtype` on CPU from a warm
page cache (the files are read once first), alternating, best of
`--repeats`. Prints `load_ratio=<omnitrain / from_pretrained>` (target <= 1.0)
and, for a pp4 split balanced by bytes (encoders on stage 0), the bytes each
rank reads and its share of the folder.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import time
from pathlib import Path

import torch

CONF = str(Path(__file__).resolve().parents[1] / "src" / "omnitrain" / "conf")
SHARD = 2 * 2**30


def write_folder(family, folder: Path) -> None:
    """Random weights in the folder layout save_pretrained writes (names, shards, index, config)."""
    from safetensors.torch import save_file

    from omnitrain.convert import hf

    if (folder / hf.INDEX).is_file():
        print(f"reusing {folder}")
        return
    folder.mkdir(parents=True, exist_ok=True)
    meta = family.build_meta()
    tied = hf.tied_keys(meta)
    shapes = {family.to_hf_name(k): tuple(v.shape) for k, v in meta.state_dict().items() if k not in tied}
    # Random values from one pool, tiled: a load reads the same bytes whatever they are,
    # and drawing 3.75 B fresh numbers would take most of the run on a small CPU.
    pool = (torch.rand(1 << 24, generator=torch.Generator().manual_seed(0)) * 0.04 - 0.02).to(torch.bfloat16)
    shards, cur, size = [], [], 0
    for key, shape in shapes.items():
        n = torch.Size(shape).numel() * 2
        if cur and size + n > SHARD:
            shards.append(cur)
            cur, size = [], 0
        cur.append(key)
        size += n
    shards.append(cur)
    index = {}
    t0 = time.perf_counter()
    for i, keys in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {k: _fill(pool, shapes[k], offset=i) for i, k in enumerate(keys)}
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
        index.update({k: file for k in keys})
        del tensors
    total = sum(torch.Size(s).numel() * 2 for s in shapes.values())
    (folder / hf.INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": index}))
    cfg = family.hf_config
    cfg.architectures = [family.hf_architecture]
    cfg.save_pretrained(folder)
    print(f"wrote {folder}: {len(shapes)} tensors, {total / 2**30:.2f} GiB in {len(shards)} shards, {time.perf_counter() - t0:.1f} s")


def _fill(pool: torch.Tensor, shape, offset: int) -> torch.Tensor:
    n = torch.Size(shape).numel()
    start = (offset * 7919) % pool.numel()
    reps = (start + n) // pool.numel() + 1
    return pool.repeat(reps)[start : start + n].reshape(shape).clone() if reps > 1 else pool[start : start + n].reshape(shape).clone()


def warm(folder: Path) -> None:
    for f in sorted(folder.glob("*.safetensors")):
        with open(f, "rb") as h:
            while h.read(64 << 20):
                pass


def load_ours(folder: Path, dtype) -> tuple[float, dict]:
    from omnitrain.convert.hf import materialize
    from omnitrain.models import hf_family
    from omnitrain.parallel.layout import whole_plan

    t0 = time.perf_counter()
    family = hf_family(str(folder), config={}, init_from=str(folder))
    model = family.build_meta()
    prefixes = family.owned_prefixes(whole_plan(family.depths))
    stats = materialize(family, model, prefixes, folder, torch.device("cpu"), 0, dtype=dtype)
    dt = time.perf_counter() - t0
    del model
    return dt, stats


def load_hf(folder: Path, dtype, cls) -> float:
    t0 = time.perf_counter()
    model = cls.from_pretrained(str(folder), dtype=dtype)
    dt = time.perf_counter() - t0
    del model
    return dt


def stage_bytes(family, counts: dict[str, list[int]], nbytes: dict[str, int]) -> list[int]:
    """File bytes each stage owns for a split (`nbytes`: in-memory name -> bytes in the files)."""
    from omnitrain.parallel.layout import validate_layout

    plans = validate_layout(4, counts, family.depths, num_microbatches=4, schedule="1f1b")
    out = []
    for plan in plans:
        prefixes = tuple(p + "." for p in family.owned_prefixes(plan))
        out.append(sum(n for k, n in nbytes.items() if k.startswith(prefixes)))
    return out


def balanced_pp4(family, nbytes: dict[str, int]) -> dict[str, list[int]]:
    """Encoders on stage 0; the LLM split whose largest stage (in bytes) is smallest."""
    depth = family.depths[family.decoder]
    best = None
    for a, b, c in itertools.combinations(range(depth + 3), 3):
        split = [a, b - a - 1, c - b - 1, depth + 2 - c]
        if split[-1] < 1 or min(split[1:]) < 1:
            continue
        counts = {m: ([d, 0, 0, 0] if m != family.decoder else split) for m, d in family.depths.items()}
        worst = max(stage_bytes(family, counts, nbytes))
        if best is None or worst < best[0]:
            best = (worst, counts)
    return best[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--small", action="store_true", help="the tiny qwen25_omni (real depths, tiny widths) instead of the 3B")
    ap.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    ap.add_argument("--dir", default=None, help="folder to write (default /tmp/omnitrain_bench_load_<size>)")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

    from hydra import compose, initialize_config_dir

    from omnitrain.config import register_configs
    from omnitrain.convert import hf
    from omnitrain.models.family import build_family, import_object

    register_configs()
    name = "qwen25_omni" if args.small else "qwen25_omni_3b"
    with initialize_config_dir(config_dir=CONF, version_base=None):
        cfg = compose("config", overrides=[f"model={name}"])
    folder = Path(args.dir or f"/tmp/omnitrain_bench_load_{'small' if args.small else '3b'}")
    family = build_family(cfg.model)
    write_folder(family, folder)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    cls = import_object(family.hf_class)
    warm(folder)

    ours, theirs = [], []
    for _ in range(args.repeats):  # alternate, so machine noise hits both alike
        dt, stats = load_ours(folder, dtype)
        ours.append(dt)
        gc.collect()
        theirs.append(load_hf(folder, dtype, cls))
        gc.collect()
    total = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    print(f"model={name} folder {total / 2**30:.2f} GiB, {stats['tensors']} tensors, dtype {args.dtype}, best of {args.repeats}")
    print(f"omnitrain meta build + materialize: {min(ours):.2f} s  (all: {', '.join(f'{t:.2f}' for t in ours)})")
    print(f"transformers from_pretrained:       {min(theirs):.2f} s  (all: {', '.join(f'{t:.2f}' for t in theirs)})")
    print(f"load_ratio={min(ours) / min(theirs):.3f}")

    # pp4: what each rank reads, measured by materializing its stage alone.
    from omnitrain.convert.hf import materialize, model_tensors

    available = model_tensors(family, folder)
    from safetensors import safe_open

    nbytes = {}
    for file in sorted({f for f, _ in available.values()}):
        with safe_open(folder / file, "pt") as f:
            for k, (ff, key) in available.items():
                if ff == file:
                    sl = f.get_slice(key)
                    nbytes[k] = torch.Size(sl.get_shape()).numel() * hf.DTYPES[sl.get_dtype()].itemsize
    counts = balanced_pp4(family, nbytes)
    from omnitrain.parallel.layout import validate_layout

    plans = validate_layout(4, counts, family.depths, num_microbatches=4, schedule="1f1b")
    print(f"pp4 split: {', '.join(f'{m}={c}' for m, c in counts.items())}")
    read = []
    for plan in plans:
        model = family.build_meta()
        t0 = time.perf_counter()
        stats = materialize(family, model, family.owned_prefixes(plan), folder, torch.device("cpu"), 0, dtype=dtype)
        read.append(stats["bytes"])
        print(f"  rank {plan.rank}: reads {stats['bytes'] / 2**20:9.1f} MiB ({stats['bytes'] / total:5.1%} of the folder), "
              f"{stats['tensors']} tensors, {time.perf_counter() - t0:.2f} s")
        del model
        gc.collect()
    print(f"pp4_bytes_share={','.join(f'{b / sum(read):.3f}' for b in read)}  (sum {sum(read) / total:.1%} of the folder)")


if __name__ == "__main__":
    main()
