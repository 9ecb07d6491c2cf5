"""Dataset descriptions and records -> `Example`s (pure parsing, no decoding).

Two input formats:
- LLaMA-Factory's sharegpt mllm json: `messages` (role/content, names set by
  `tags`), `images` / `videos` / `audios` lists relative to the json's folder,
  `<image>` `<video>` `<audio>` placeholders; described by a dataset_info.json
  entry whose `columns` and `tags` are honoured.
- LLaVA json: `conversations` (from/value, human/gpt), `image` (one path or a
  list); `video` / `audio` likewise.

Every structural problem (missing file, placeholder count, empty or
unanswered conversation, unknown column) is a `DataError` naming the dataset,
the sample index and the file, found here before anything is decoded.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from omnitrain.data.errors import DataError

PLACEHOLDERS = {"image": "<image>", "video": "<video>", "audio": "<audio>"}
PLACEHOLDER_RE = re.compile(r"(<image>|<video>|<audio>)")
MEDIA_KINDS = ("image", "video", "audio")

# dataset_info.json keys this loader understands; anything else is an error
# (a typo there must not silently drop a column).
KNOWN_COLUMNS = {"messages", "system", "images", "videos", "audios", "use_audio_in_video"}
KNOWN_TAGS = {
    "role_tag",
    "content_tag",
    "user_tag",
    "assistant_tag",
    "observation_tag",
    "function_tag",
    "system_tag",
}
KNOWN_ENTRY_KEYS = {"file_name", "formatting", "columns", "tags", "use_audio_in_video", "num_samples"}
SHAREGPT_TAGS = {
    "role_tag": "from",
    "content_tag": "value",
    "user_tag": "human",
    "assistant_tag": "gpt",
    "observation_tag": "observation",
    "function_tag": "function_call",
    "system_tag": "system",
}
MESSAGES_TAGS = {**SHAREGPT_TAGS, "role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}


@dataclass
class Example:
    """One conversation with absolute media paths, ready to be processed."""

    dataset: str
    index: int
    turns: List[Tuple[str, str]]  # (role, text), role in {"user", "assistant"}
    system: Optional[str] = None
    images: List[str] = field(default_factory=list)
    videos: List[str] = field(default_factory=list)
    audios: List[str] = field(default_factory=list)
    use_audio_in_video: Optional[bool] = None  # None: dataset / config default
    record: Any = None  # the raw record (for cache keys)

    def media(self, kind: str) -> List[str]:
        return {"image": self.images, "video": self.videos, "audio": self.audios}[kind]


@dataclass
class DatasetSpec:
    """A dataset_info entry (or a bare json path) resolved to a file."""

    name: str
    file: Path
    formatting: str = "sharegpt"  # sharegpt | llava
    columns: Dict[str, str] = field(default_factory=dict)
    tags: Dict[str, str] = field(default_factory=dict)
    use_audio_in_video: Optional[bool] = None
    num_samples: Optional[int] = None


def split_names(dataset: Any) -> List[str]:
    """`a,b` or [a, b] -> ['a', 'b'] (Hydra may hand either)."""
    if dataset is None:
        return []
    if isinstance(dataset, str):
        items = dataset.split(",")
    else:
        items = [str(x) for x in dataset]
    return [x.strip() for x in items if x.strip()]


def read_dataset_info(dataset_dir: Path) -> Dict[str, Any]:
    path = dataset_dir / "dataset_info.json"
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"invalid JSON ({e})", file=str(path), reason="bad_json") from None


def resolve_specs(dataset_dir: Path, names: Sequence[str]) -> List[DatasetSpec]:
    """Dataset names (dataset_info keys or json paths) -> specs."""
    info = read_dataset_info(dataset_dir)
    specs = []
    for name in names:
        if name in info:
            specs.append(_spec_from_entry(name, info[name], dataset_dir))
            continue
        path = Path(name).expanduser()
        if not path.is_absolute() and not path.exists():
            path = dataset_dir / name
        if path.suffix in (".json", ".jsonl") and path.exists():
            specs.append(DatasetSpec(name=name, file=path, formatting="auto"))
            continue
        known = ", ".join(sorted(info)) or "(no dataset_info.json there)"
        raise DataError(
            f"unknown dataset {name!r}: not in {dataset_dir / 'dataset_info.json'} and not a json file; known: {known}",
            dataset=name,
            reason="unknown_dataset",
        )
    return specs


def _spec_from_entry(name: str, entry: Dict[str, Any], dataset_dir: Path) -> DatasetSpec:
    where = dataset_dir / "dataset_info.json"
    unknown = set(entry) - KNOWN_ENTRY_KEYS
    if unknown:
        raise DataError(
            f"unsupported key(s) {sorted(unknown)} in {where}; supported: {sorted(KNOWN_ENTRY_KEYS)}",
            dataset=name,
            file=str(where),
            reason="unknown_column",
        )
    if "file_name" not in entry:
        raise DataError(f"no file_name in {where}", dataset=name, file=str(where), reason="bad_info")
    columns = dict(entry.get("columns") or {})
    bad = set(columns) - KNOWN_COLUMNS
    if bad:
        raise DataError(
            f"unknown or unsupported column(s) {sorted(bad)} in {where}; supported: {sorted(KNOWN_COLUMNS)}",
            dataset=name,
            file=str(where),
            reason="unknown_column",
        )
    tags = dict(entry.get("tags") or {})
    bad = set(tags) - KNOWN_TAGS
    if bad:
        raise DataError(
            f"unknown tag(s) {sorted(bad)} in {where}; known tags: {sorted(KNOWN_TAGS)}",
            dataset=name,
            file=str(where),
            reason="unknown_column",
        )
    formatting = entry.get("formatting", "sharegpt")
    if formatting not in ("sharegpt", "llava"):
        raise DataError(
            f"formatting {formatting!r} is not supported (sharegpt or llava)", dataset=name, file=str(where), reason="bad_info"
        )
    return DatasetSpec(
        name=name,
        file=dataset_dir / entry["file_name"],
        formatting=formatting,
        columns=columns,
        tags=tags,
        use_audio_in_video=entry.get("use_audio_in_video"),
        num_samples=entry.get("num_samples"),
    )


def read_records(spec: DatasetSpec) -> List[Any]:
    if not spec.file.exists():
        raise DataError("dataset file not found", dataset=spec.name, file=str(spec.file), reason="missing_file")
    if not spec.file.is_file():
        raise DataError(
            "is a folder, not a json/jsonl file: point file_name in dataset_info.json at the file",
            dataset=spec.name, file=str(spec.file), reason="missing_file",
        )
    text = spec.file.read_text(encoding="utf-8")
    try:
        if spec.file.suffix == ".jsonl":
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            records = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"invalid JSON ({e})", dataset=spec.name, file=str(spec.file), reason="bad_json") from None
    if not isinstance(records, list):
        raise DataError("expected a JSON list of samples", dataset=spec.name, file=str(spec.file), reason="bad_json")
    return records


def detect_formatting(records: List[Any]) -> str:
    first = next((r for r in records if isinstance(r, dict)), {})
    if "conversations" in first and "messages" not in first:
        return "llava"
    return "sharegpt"


def parse_record(spec: DatasetSpec, index: int, record: Any, check_files: bool = True) -> Example:
    """One raw record -> a validated `Example` (raises DataError)."""
    err = lambda msg, reason, file=None: DataError(msg, dataset=spec.name, index=index, file=file or str(spec.file), reason=reason)  # noqa: E731
    if not isinstance(record, dict):
        raise err(f"sample is a {type(record).__name__}, expected an object", "bad_sample")
    formatting = spec.formatting if spec.formatting != "auto" else detect_formatting([record])
    if formatting == "llava":
        columns = {"messages": "conversations", "images": "image", "videos": "video", "audios": "audio", "system": "system"}
        columns.update(spec.columns)
        tags = {**SHAREGPT_TAGS, **spec.tags}
    else:
        columns = {"messages": "messages" if "messages" in record else "conversations"}
        columns.update({"images": "images", "videos": "videos", "audios": "audios", "system": "system"})
        columns.update(spec.columns)
        default_tags = MESSAGES_TAGS if columns["messages"] == "messages" else SHAREGPT_TAGS
        tags = {**default_tags, **spec.tags}

    msg_col = columns["messages"]
    if msg_col not in record:
        raise err(f"column {msg_col!r} not in sample (keys: {sorted(record)}); fix `columns` in dataset_info.json", "unknown_column")
    messages = record[msg_col]
    if not isinstance(messages, list) or not messages:
        raise err("empty conversation", "empty_conversation")

    system = record.get(columns["system"]) if columns.get("system") else None
    turns: List[Tuple[str, str]] = []
    role_of = {
        tags["user_tag"]: "user",
        tags["observation_tag"]: "user",
        tags["assistant_tag"]: "assistant",
        tags["function_tag"]: "assistant",
    }
    for j, m in enumerate(messages):
        if not isinstance(m, dict) or tags["role_tag"] not in m or tags["content_tag"] not in m:
            raise err(f"message {j} lacks {tags['role_tag']!r}/{tags['content_tag']!r}", "bad_sample")
        role, text = m[tags["role_tag"]], m[tags["content_tag"]]
        if role == tags["system_tag"] and j == 0:
            system = text
            continue
        if role not in role_of:
            raise err(f"message {j} has unknown role {role!r}; expected one of {sorted(role_of)}", "bad_sample")
        if not isinstance(text, str):
            raise err(f"message {j} content is not a string", "bad_sample")
        turns.append((role_of[role], text))
    if not turns:
        raise err("empty conversation", "empty_conversation")
    for j, (role, _) in enumerate(turns):
        want = "user" if j % 2 == 0 else "assistant"
        if role != want:
            raise err(f"turn {j} is from {role!r}; turns must alternate user/assistant starting with user", "bad_turns")
    if turns[-1][0] != "assistant":
        raise err("the last turn is from the user; a sample must end with the assistant's answer", "no_answer")

    base = spec.file.parent
    media: Dict[str, List[str]] = {}
    for kind in MEDIA_KINDS:
        col = columns.get(kind + "s")
        value = record.get(col) if col else None
        if value is None:
            value = []
        elif isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise err(f"column {col!r} must be a list of paths", "bad_sample")
        media[kind] = [v if os.path.isabs(v) else str(base / v) for v in value]
        n_ph = sum(t.count(PLACEHOLDERS[kind]) for _, t in turns)
        if n_ph != len(media[kind]):
            files = ", ".join(media[kind]) or "none"
            raise err(
                f"{n_ph} {PLACEHOLDERS[kind]} placeholder(s) but {len(media[kind])} {kind} file(s) ({files})",
                "placeholder_mismatch",
                file=media[kind][0] if media[kind] else None,
            )
        if check_files:
            for p in media[kind]:
                if not os.path.isfile(p):
                    raise err(f"{kind} file not found", "missing_file", file=p)

    uiv = record.get(columns.get("use_audio_in_video", "use_audio_in_video"))
    if uiv is not None and not isinstance(uiv, bool):
        raise err(f"use_audio_in_video must be true/false, got {uiv!r}", "bad_sample")
    return Example(
        dataset=spec.name,
        index=index,
        turns=turns,
        system=system,
        images=media["image"],
        videos=media["video"],
        audios=media["audio"],
        use_audio_in_video=uiv,
        record=record,
    )
