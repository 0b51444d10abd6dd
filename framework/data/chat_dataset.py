"""Chat datasets: files of conversations -> one checked, tokenised cache that every rank memory-maps.

Owns: reading conversations from the files behind `data.paths` (JSON lines, a JSON array, parquet, `datasets`
save_to_disk; found as for pretraining, framework/data/sources.py), turning each into messages (`chat_formats.py`),
rendering and labelling it (`chat_template.py`), and the checks on the whole (a record that is not a conversation, an
unknown role, a template that fails: one line naming the file and line; no assistant token in the whole dataset), all
in one pass before training (`build_chat_cache`, run by the plan on each machine's first process). The result, under
`cache_dir/chat/<key>/`, holds the token ids, which of them are labelled, and where each conversation starts; `key`
hashes the files' sizes and times, the tokenizer, its template and the chat settings, so a restart reuses it and any
change rebuilds it. Does not own packing (`chat_rows.py`).

Conversations without any assistant turn teach nothing (the loss is on assistant tokens only): they are left out and
counted in the build's summary.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from framework.config.load import ConfigError
from framework.data.chat_formats import ChatFields, ChatFormatError, to_messages
from framework.data.chat_template import IGNORE_INDEX, ChatRenderer, TemplateError
from framework.data.sources import DataFile, _load_dataset, check_text_bytes, find_data_files, json_records

CACHE_FORMAT = 1


@dataclass(frozen=True)
class ChatSettings:
    """What decides a conversation's tokens and labels besides the files and the tokenizer (the `chat` section)."""

    fields: ChatFields = field(default_factory=ChatFields)
    loss_on: str = "all"  # "all" assistant turns or the "last" one
    template_kwargs: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------------------- reading


def _json_records(path: str) -> Iterator[tuple[str, object]]:
    """(location, parsed record): `FILE:LINE` for JSON lines, `FILE: array element I` for a JSON array."""
    check_text_bytes(path)  # NUL bytes and invalid UTF-8 named by line, as for pretraining corpora
    yield from json_records(path, "one conversation object")


def _arrow_records(file: DataFile, cache_dir: str | None) -> Iterator[tuple[str, object]]:
    dataset = _load_dataset(file, cache_dir)
    for start in range(0, dataset.num_rows, 1024):
        batch = dataset[start:start + 1024]
        names = list(batch)
        for i in range(len(batch[names[0]]) if names else 0):
            yield f"{file.path}: row {start + i}", {name: batch[name][i] for name in names}


def iter_records(paths: Sequence[str], cache_dir: str | None = None) -> Iterator[tuple[str, object]]:
    """Every record of every data file of `paths`, in file order, with its location for messages."""
    for file in find_data_files(paths, cache_dir):
        if file.kind == "json":
            yield from _json_records(file.path)
        elif file.kind in ("parquet", "saved"):
            yield from _arrow_records(file, cache_dir)
        else:
            raise ValueError(f"{file.path}: a plain text file; chat data is JSON lines, a JSON array, parquet or a "
                             "saved dataset with one conversation per record")


# ------------------------------------------------------------------------------------------------------------- cache


def cache_key(paths: Sequence[str], tokenizer, settings: ChatSettings, cache_dir: str | None) -> str:
    """Changes whenever anything that decides the cached tokens does: the files (size, time), the tokenizer (its
    files' sizes and times, its vocabulary size, its chat template) and the chat settings."""
    files = []
    for file in find_data_files(paths, cache_dir):
        st = os.stat(file.path)
        files.append([os.path.abspath(file.path), st.st_size, st.st_mtime_ns])
    source = getattr(tokenizer, "name_or_path", "") or ""
    tok_files = []
    if os.path.isdir(source):
        for name in sorted(os.listdir(source)):
            if name.startswith("tokenizer") or name.endswith(".jinja") or name == "special_tokens_map.json":
                st = os.stat(os.path.join(source, name))
                tok_files.append([name, st.st_size, st.st_mtime_ns])
    blob = json.dumps({"format": CACHE_FORMAT, "files": files, "tokenizer": [os.path.abspath(source), tok_files,
                       len(tokenizer), tokenizer.chat_template, tokenizer.eos_token],
                       "settings": asdict(settings)}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cache_path(paths: Sequence[str], tokenizer, settings: ChatSettings, cache_dir: str) -> str:
    return os.path.join(cache_dir, "chat", cache_key(paths, tokenizer, settings, cache_dir))


def build_chat_cache(paths: Sequence[str], tokenizer, settings: ChatSettings, cache_dir: str,
                     key: str = "data.paths") -> tuple[str, dict]:
    """Check and tokenise every conversation of `paths` into `cache_path(...)` unless it is there already; returns
    (the directory, its summary). Written under a temporary name and renamed: concurrent builders (one per machine
    on a shared filesystem) and interrupted ones never leave a partial cache under the final name.

    Raises:
        ConfigError: `<key>: FILE:LINE: what is wrong; how to fix it` for the first bad conversation, or
            `<key>: ...: no conversation has an assistant message` for a dataset with nothing to learn.
    """
    try:
        out = cache_path(paths, tokenizer, settings, cache_dir)
        if os.path.isfile(os.path.join(out, "summary.json")):
            return out, read_summary(out)
        renderer = ChatRenderer(tokenizer, settings.loss_on, settings.template_kwargs)
    except TemplateError as e:
        raise ConfigError(f"{key}: tokenizer {getattr(tokenizer, 'name_or_path', '')}: {e}") from None
    except (ValueError, OSError) as e:
        raise ConfigError(f"{key}: {e}") from None
    ids_parts, mask_parts, lengths, first_labels = [], [], [], []
    total = without_assistant = 0
    first_without = None
    try:
        for where, record in iter_records(paths, cache_dir):
            total += 1
            try:
                ids, labels = renderer.encode(to_messages(record, settings.fields))
            except (ChatFormatError, TemplateError) as e:
                raise ConfigError(f"{key}: {where}: {e}") from None
            labelled = np.flatnonzero(labels != IGNORE_INDEX)
            if len(labelled) == 0 or labelled[0] == 0:  # position 0 predicts nothing: not a usable label
                without_assistant += 1
                first_without = first_without or where
                continue
            ids_parts.append(ids)
            mask_parts.append(labels != IGNORE_INDEX)
            lengths.append(len(ids))
            first_labels.append(int(labelled[0]))
    except ConfigError:
        raise
    except (ValueError, OSError) as e:
        raise ConfigError(f"{key}: {e}") from None
    if not lengths:
        where = first_without or ", ".join(paths)
        raise ConfigError(f"{key}: {where}: no conversation has an assistant message ({total} conversation"
                          f"{'s' if total != 1 else ''} read); the loss is on assistant turns only, so there is "
                          "nothing to train on: add assistant messages (role 'assistant', ShareGPT 'gpt', Alpaca "
                          "'output')")
    summary = {"format": CACHE_FORMAT, "conversations": len(lengths), "read": total,
               "without_assistant": without_assistant, "first_without_assistant": first_without,
               "tokens": int(sum(lengths)), "labelled_tokens": int(sum(int(m.sum()) for m in mask_parts))}
    tmp = f"{out}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        np.save(os.path.join(tmp, "input_ids.npy"), np.concatenate(ids_parts).astype(np.int32))
        np.save(os.path.join(tmp, "labelled.npy"), np.concatenate(mask_parts))
        np.save(os.path.join(tmp, "offsets.npy"), np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))
        np.save(os.path.join(tmp, "first_label.npy"), np.asarray(first_labels, dtype=np.int64))
        with open(os.path.join(tmp, "summary.json"), "w") as f:
            json.dump(summary, f)
        try:
            os.rename(tmp, out)
        except OSError:  # another process finished the same cache first: theirs is identical
            if not os.path.isfile(os.path.join(out, "summary.json")):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out, summary


def read_summary(path: str) -> dict:
    with open(os.path.join(path, "summary.json")) as f:
        return json.load(f)


class ChatData:
    """A built cache, memory-mapped: conversation i is input_ids[offsets[i]:offsets[i+1]] with its label mask."""

    def __init__(self, path: str):
        if not os.path.isfile(os.path.join(path, "summary.json")):
            raise FileNotFoundError(f"{path}: the tokenised chat data is missing (it is built before training by the "
                                    "first process of each machine)")
        load = lambda name: np.load(os.path.join(path, name), mmap_mode="r")  # noqa: E731
        self.path = path
        self.input_ids, self.labelled = load("input_ids.npy"), load("labelled.npy")
        self.offsets, self.first_label = load("offsets.npy"), load("first_label.npy")
        self.summary = read_summary(path)
        self.num_conversations = len(self.first_label)

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def conversation(self, i: int, limit: int) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids, labels) of conversation i, its first `limit` tokens at most (truncated from the end)."""
        a = int(self.offsets[i])
        b = min(int(self.offsets[i + 1]), a + limit)
        ids = np.asarray(self.input_ids[a:b], dtype=np.int64)
        return ids, np.where(self.labelled[a:b], ids, IGNORE_INDEX)


def summary_lines(summary: dict, key: str = "data.paths") -> list[str]:
    """The build's counts for the log (rank 0, once)."""
    lines = [f"{key}: {summary['conversations']} conversations, {summary['tokens']} tokens, "
             f"{summary['labelled_tokens']} of them assistant tokens (the loss is on those)"]
    if summary["without_assistant"]:
        lines.append(f"{key}: {summary['without_assistant']} conversations without an assistant message left out "
                     f"(first at {summary['first_without_assistant']})")
    return lines
