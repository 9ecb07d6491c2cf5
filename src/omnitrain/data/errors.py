"""One-line data errors: which dataset, which sample, which file, what is wrong."""

from __future__ import annotations

from typing import Optional

from omnitrain.errors import UserError


class DataError(UserError, ValueError):
    """A sample (or a dataset description) that cannot be used.

    `str()` is a single line naming the dataset, the sample index and the file,
    so a CLI can print it instead of a traceback. `reason` is a short stable
    key used to count skips per cause.
    """

    kind = "data error"

    def __init__(
        self,
        message: str,
        *,
        dataset: Optional[str] = None,
        index: Optional[int] = None,
        file: Optional[str] = None,
        reason: str = "invalid",
    ):
        self.message = message
        self.dataset = dataset
        self.index = index
        self.file = file
        self.reason = reason
        super().__init__(self._line())

    def _line(self) -> str:
        where = []
        if self.dataset is not None:
            where.append(f"dataset {self.dataset!r}")
        if self.index is not None:
            where.append(f"sample {self.index}")
        if self.file is not None:
            where.append(f"file {self.file}")
        prefix = ", ".join(where)
        return f"{prefix}: {self.message}" if prefix else self.message

    def at(self, dataset: Optional[str] = None, index: Optional[int] = None) -> "DataError":
        """The same error located at a sample (keeps what is already known)."""
        return DataError(
            self.message,
            dataset=self.dataset if self.dataset is not None else dataset,
            index=self.index if self.index is not None else index,
            file=self.file,
            reason=self.reason,
        )

    def __reduce__(self):
        # Picklable across DataLoader workers with all fields intact.
        return (_rebuild, (self.message, self.dataset, self.index, self.file, self.reason))


def _rebuild(message, dataset, index, file, reason):
    return DataError(message, dataset=dataset, index=index, file=file, reason=reason)
