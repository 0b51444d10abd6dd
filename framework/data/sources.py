"""Reading documents from files and folders: the corpus as a random-access list of texts.

Owns: finding the data files behind the user's `paths` (files, folders searched recursively, `datasets` save_to_disk
directories), opening each one as a source of documents, the checks on them (missing path, unknown extension,
`text_field` absent or not text, no documents), and `Corpus`, which maps a global document id to its text. Does not own
tokenisation, document order or packing (see `tokenizer.py`, `order.py`, `stream.py`, `packing.py`).

Formats, one document per:
    .jsonl / .json   line or row (JSON lines, or a JSON array of objects), text in `text_field`
    .parquet         row, text in `text_field`
    .txt / .md       file (read when its document is first needed, so a folder of many files costs no memory)
    save_to_disk     row of a `datasets.Dataset` directory (`state.json` + `dataset_info.json`), or of the "train"
                     split of a saved `DatasetDict` (`dataset_dict.json`)

JSON and parquet files go through `datasets.Dataset.from_json` / `from_parquet`, which convert each file once into a
memory-mapped Arrow cache (under `cache_dir` when given, else the Hugging Face default) and reuse it while the file is
unchanged, so corpus memory does not grow with corpus size. (Not `datasets.load_dataset`: it sends a download-count
request to the Hub on every call.) Document ids are global, numbered in file order, then row order.
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass


SUFFIX_KINDS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text", ".md": "text"}
SAVED_DATASET_FILES = ("state.json", "dataset_info.json")
SAVED_DATASET_DICT_FILE = "dataset_dict.json"
_KIND_NAMES = {"json": "JSON lines or a JSON array", "parquet": "parquet", "saved": "a saved dataset"}


@dataclass(frozen=True)
class DataFile:
    path: str
    kind: str  # "json", "parquet", "text" or "saved"


# ----------------------------------------------------------------------------------------------------------- finding


def _saved_dataset_kind(path: str) -> str | None:
    if all(os.path.isfile(os.path.join(path, name)) for name in SAVED_DATASET_FILES):
        return "saved"
    if os.path.isfile(os.path.join(path, SAVED_DATASET_DICT_FILE)):
        return "saved"
    return None


def _walk_folder(folder: str, skip: set[str]) -> Iterator[DataFile]:
    """Data files under `folder`, depth first in sorted order; hidden entries and saved datasets' insides skipped."""
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if name.startswith(".") or os.path.realpath(path) in skip:
            continue
        if os.path.isdir(path):
            if _saved_dataset_kind(path):
                yield DataFile(path, "saved")
            else:
                yield from _walk_folder(path, skip)
        elif os.path.splitext(name)[1].lower() in SUFFIX_KINDS:
            yield DataFile(path, SUFFIX_KINDS[os.path.splitext(name)[1].lower()])


def find_data_files(paths: Sequence[str], cache_dir: str | None = None) -> list[DataFile]:
    """The data files named by `paths`, in the order given (folders expanded in sorted order).

    Raises:
        FileNotFoundError: a path does not exist.
        ValueError: a file has an unsupported extension, or a folder holds no data files.
    """
    if isinstance(paths, str):
        raise ValueError(f"paths must be a list of files or folders, got the string {paths!r}; write [{paths!r}]")
    if not paths:
        raise ValueError("paths is empty; give at least one data file or folder")
    skip = {os.path.realpath(cache_dir)} if cache_dir else set()
    found: list[DataFile] = []
    for path in paths:
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path}: data path does not exist")
        if os.path.isdir(path):
            kind = _saved_dataset_kind(path)
            files = [DataFile(path, kind)] if kind else list(_walk_folder(path, skip))
            if not files:
                raise ValueError(f"{path}: folder holds no data files ({', '.join(SUFFIX_KINDS)}) or saved datasets")
            found.extend(files)
        else:
            suffix = os.path.splitext(path)[1].lower()
            if suffix not in SUFFIX_KINDS:
                raise ValueError(f"{path}: unknown extension {suffix or '(none)'!r}; "
                                 f"expected one of {', '.join(SUFFIX_KINDS)} or a saved dataset folder")
            found.append(DataFile(path, SUFFIX_KINDS[suffix]))
    return found


# ----------------------------------------------------------------------------------------------------------- opening


class TextFileSource:
    """One .txt/.md file = one document, read on demand (UTF-8; undecodable bytes become U+FFFD)."""

    num_docs = 1

    def __init__(self, path: str):
        if os.path.getsize(path) == 0:
            raise ValueError(f"{path}: no documents (the file is empty)")
        self.path = path

    def texts(self, rows: Sequence[int]) -> list[str]:
        with open(self.path, encoding="utf-8", errors="replace") as f:
            text = f.read()
        return [text for _ in rows]


class ArrowSource:
    """The rows of one memory-mapped `datasets.Dataset`, reduced to its text column."""

    def __init__(self, path: str, dataset: datasets.Dataset, text_field: str):
        if dataset.num_rows == 0:
            raise ValueError(f"{path}: no documents (0 rows)")
        if text_field not in dataset.column_names:
            raise ValueError(f"{path}: no field {text_field!r} (fields found: {', '.join(dataset.column_names)}); "
                             f"set text_field to the one holding the text")
        feature = dataset.features[text_field]
        if getattr(feature, "dtype", None) not in ("string", "large_string"):
            raise ValueError(f"{path}: field {text_field!r} holds {feature}, not text")
        dataset = dataset.select_columns([text_field])
        column = dataset.data.column(text_field)
        if column.null_count:
            import pyarrow.compute as pc  # noqa: PLC0415

            first = pc.index(pc.is_null(column), True).as_py()
            raise ValueError(f"{path}: {column.null_count} of {dataset.num_rows} rows have no {text_field!r} "
                             f"(first at row {first})")
        self.path, self.dataset, self.text_field = path, dataset, text_field
        self.num_docs = dataset.num_rows

    def texts(self, rows: Sequence[int]) -> list[str]:
        return self.dataset[[int(r) for r in rows]][self.text_field]


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    """No progress bars or error logs from `datasets` (our exception says it in one line), restored afterwards."""
    import datasets  # noqa: PLC0415
    bars_were_off = datasets.are_progress_bars_disabled()
    level = datasets.logging.get_verbosity()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(logging.CRITICAL)
    try:
        yield
    finally:
        datasets.logging.set_verbosity(level)
        if not bars_were_off:
            datasets.enable_progress_bars()


def _root_cause(exc: BaseException) -> str:
    """The innermost exception of a chain, in one line (datasets wraps the useful pyarrow message)."""
    seen = {id(exc)}
    while (exc.__cause__ or exc.__context__) is not None and id(exc.__cause__ or exc.__context__) not in seen:
        exc = exc.__cause__ or exc.__context__
        seen.add(id(exc))
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def _is_blank(path: str, limit: int = 1 << 16) -> bool:
    if os.path.getsize(path) > limit:
        return False
    with open(path, "rb") as f:
        return not f.read().strip()


def _num_parquet_rows(path: str) -> int:
    import pyarrow.parquet as pq  # noqa: PLC0415

    try:
        return pq.ParquetFile(path).metadata.num_rows
    except Exception as e:  # pyarrow raises ArrowInvalid, OSError...
        raise ValueError(f"{path}: cannot be read as parquet ({_root_cause(e)})") from e


def _load_dataset(file: DataFile, cache_dir: str | None) -> "datasets.Dataset":  # noqa: F821
    # Imported here: plain-text corpora need neither datasets nor pyarrow (about 70 MB of wheels).
    try:
        import datasets  # noqa: PLC0415
    except ImportError:
        raise ValueError(f"{file.path}: reading {_KIND_NAMES[file.kind]} needs the datasets package; "
                         "pip install datasets") from None
    if file.kind != "saved" and _is_blank(file.path):
        raise ValueError(f"{file.path}: no documents (the file is empty)")
    if file.kind == "parquet" and _num_parquet_rows(file.path) == 0:
        raise ValueError(f"{file.path}: no documents (0 rows)")
    hf_cache = os.path.join(cache_dir, "hf_datasets") if cache_dir else None
    try:
        with _quiet_datasets():
            if file.kind == "saved":
                loaded = datasets.load_from_disk(file.path)
            elif file.kind == "json":
                loaded = datasets.Dataset.from_json(file.path, cache_dir=hf_cache)
            else:
                loaded = datasets.Dataset.from_parquet(file.path, cache_dir=hf_cache)
    except Exception as e:  # datasets and pyarrow raise many types; all mean "cannot read this file"
        raise ValueError(f"{file.path}: cannot be read as {_KIND_NAMES[file.kind]} ({_root_cause(e)})") from e
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise ValueError(f"{file.path}: saved DatasetDict has no 'train' split (splits: {', '.join(loaded)})")
        loaded = loaded["train"]
    return loaded


def open_source(file: DataFile, text_field: str, cache_dir: str | None) -> TextFileSource | ArrowSource:
    if file.kind == "text":
        return TextFileSource(file.path)
    return ArrowSource(file.path, _load_dataset(file, cache_dir), text_field)


# ------------------------------------------------------------------------------------------------------------ corpus


class Corpus:
    """All documents of all sources under global ids 0..num_docs-1 (file order, then row order)."""

    def __init__(self, sources: list[TextFileSource | ArrowSource]):
        self.sources = sources
        self.starts = [0]
        for source in sources:
            self.starts.append(self.starts[-1] + source.num_docs)
        self.num_docs = self.starts[-1]

    def locate(self, doc_id: int) -> tuple[int, int]:
        """(source index, row in that source) of a global document id."""
        if not 0 <= doc_id < self.num_docs:
            raise IndexError(f"document id {doc_id} out of range [0, {self.num_docs})")
        s = bisect.bisect_right(self.starts, doc_id) - 1
        return s, doc_id - self.starts[s]

    def texts(self, doc_ids: Sequence[int]) -> list[str]:
        """The texts of `doc_ids`, in that order; one batched read per source touched."""
        rows_by_source: dict[int, list[tuple[int, int]]] = {}
        for k, doc_id in enumerate(doc_ids):
            s, row = self.locate(int(doc_id))
            rows_by_source.setdefault(s, []).append((k, row))
        out: list[str] = [""] * len(doc_ids)
        for s, items in rows_by_source.items():
            for (k, _), text in zip(items, self.sources[s].texts([row for _, row in items])):
                out[k] = text
        return out


def open_corpus(paths: Sequence[str], text_field: str = "text", cache_dir: str | None = None) -> Corpus:
    """Find, open and check every data file of `paths`; errors are one line naming the file."""
    files = find_data_files(paths, cache_dir)
    return Corpus([open_source(f, text_field, cache_dir) for f in files])
