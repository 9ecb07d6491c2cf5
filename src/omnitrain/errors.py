"""User mistakes and the one place that prints them.

Every error a user can fix (a config value, a layout, a data sample, a
checkpoint, an HF folder) is a `UserError` subclass whose message is one line
naming the key, file, sample or rank and what to do. The CLI entry points run
through `run_cli`, which prints such an error as that one line and exits 2, on
every path: in this process, or raised by a worker (launch.WorkerFailed
carries its type). Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import logging
import sys
from typing import Callable

log = logging.getLogger("omnitrain")


class UserError(Exception):
    """A mistake the user can fix; `str()` is one line. `kind` prefixes it."""

    kind = "error"


# Modules that define UserError subclasses: a worker's error arrives by class
# name, which the parent may not have imported yet.
_DEFINED_IN = (
    "omnitrain.config", "omnitrain.data.errors", "omnitrain.train.checkpoint", "omnitrain.convert.hf",
    "omnitrain.convert.__main__", "omnitrain.launch", "omnitrain.train.loop", "omnitrain.generate.load",
    "omnitrain.eval.bench",
)


def user_error_kinds() -> dict[str, str]:
    """Class name -> kind of every UserError subclass (a worker's error arrives by name)."""
    import importlib

    for name in _DEFINED_IN:
        importlib.import_module(name)
    out, todo = {}, [UserError]
    while todo:
        cls = todo.pop()
        out[cls.__name__] = cls.kind
        todo += cls.__subclasses__()
    return out


def one_line(kind: str, message: str, rank: int | None = None) -> str:
    where = f"rank {rank}: " if rank is not None else ""
    return f"{where}{kind}: " + " ".join(str(message).split())


def run_cli(fn: Callable[[], int | None]) -> int:
    """Run a CLI body; a user error becomes one line on stderr and exit code 2."""
    from omnitrain.launch import WorkerFailed

    try:
        return fn() or 0
    except UserError as e:
        line = one_line(e.kind, e)
    except WorkerFailed as e:
        kinds = user_error_kinds()
        if e.exc_type not in kinds and e.exc_type not in ("ProcessExited", "WorkerHung"):
            raise
        line = one_line(kinds.get(e.exc_type, "worker lost"), e.message, e.rank)
    except KeyboardInterrupt:
        line = "interrupted"
    _flush_logs()
    print(f"omnitrain: {line}", file=sys.stderr, flush=True)
    return 2


def _flush_logs() -> None:
    for h in logging.getLogger().handlers:
        try:
            h.flush()
        except Exception:  # a closed stream: nothing to flush
            pass
