"""Reading documents from files and folders: the corpus as a random-access list of texts.

Owns: finding the data files behind the user's `paths` (files, folders searched recursively, `datasets` save_to_disk
directories), opening each one as a source of documents, the checks on them (missing path, unknown extension,
`text_field` absent or not text, no documents, binary content), and `Corpus`, which maps a global document id to its
text. Does not own tokenisation, document order or packing (see `tokenizer.py`, `order.py`, `stream.py`, `packing.py`).

`check_corpus` runs every check before training starts: linear, chunked passes over each text / JSON file (NUL bytes
and invalid UTF-8 named by file and line, then each JSON line's object and text field), and only the schemas of parquet
files and saved datasets. `open_corpus` does not repeat those passes on every rank; where it reads anyway (a JSON file that `datasets`
cannot convert or whose text column is wrong, a text file read for its document) the same checks name the line.

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
import codecs
import contextlib
import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from framework.config.load import ConfigError

SUFFIX_KINDS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text", ".md": "text"}
SAVED_DATASET_FILES = ("state.json", "dataset_info.json")
SAVED_DATASET_DICT_FILE = "dataset_dict.json"
_KIND_NAMES = {"json": "JSON lines or a JSON array", "parquet": "parquet", "saved": "a saved dataset"}
_TEXT_TYPES = ("string", "large_string")
_READ_CHUNK = 1 << 20
# Named in the error when a "text" file starts like one of these, since a renamed binary is the usual cause.
_MAGIC = {b"\x7fELF": "an ELF executable", b"PK\x03\x04": "a zip archive", b"\x1f\x8b": "a gzip file",
          b"%PDF": "a PDF", b"PAR1": "a parquet file"}


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


# ---------------------------------------------------------------------------------------------------------- checking


def _bad_bytes(data: bytes, decoder: codecs.IncrementalDecoder, final: bool) -> tuple[int, str] | None:
    """Offset in `data` and description of its first NUL byte or invalid UTF-8; `decoder` carries a character split
    across calls (so the offset can be negative: the bad sequence began in the previous call's bytes)."""
    pending = len(decoder.getstate()[0])
    nul = data.find(b"\x00")
    try:
        decoder.decode(data, final)
        return (nul, "NUL byte") if nul >= 0 else None
    except UnicodeDecodeError as e:
        offset = e.start - pending
        if 0 <= nul < offset:
            return nul, "NUL byte"
        return offset, f"invalid UTF-8 (byte 0x{e.object[e.start]:02x})"


def _starts_like(path: str) -> str:
    with open(path, "rb") as f:
        head = f.read(8)
    kind = next((name for magic, name in _MAGIC.items() if head.startswith(magic)), None)
    return f", the file starts like {kind}" if kind else ""


def check_text_bytes(path: str) -> None:
    """No NUL byte and valid UTF-8 throughout `path`, read in chunks; a ValueError names the first bad line."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    line, offset = 1, 0
    with open(path, "rb") as f:
        while True:
            chunk = f.read(_READ_CHUNK)
            found = _bad_bytes(chunk, decoder, final=not chunk)
            if found:
                at, what = found
                line += chunk.count(b"\n", 0, max(at, 0))
                fix = ("binary content, not text; remove the file from the corpus" if what == "NUL byte" else
                       "not UTF-8 text; re-encode the file as UTF-8 (e.g. iconv -t utf-8) or remove it from the corpus")
                raise ValueError(f"{path}:{line}: {what} at byte {offset + at}{_starts_like(path)}: {fix}")
            if not chunk:
                return
            line += chunk.count(b"\n")
            offset += len(chunk)


def _json_kind(value: object) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _document_problem(doc: object, text_field: str) -> str | None:
    """What is wrong with one parsed JSON document (a line, or an element of an array), if anything."""
    if not isinstance(doc, dict):
        return (f"a JSON {_json_kind(doc)}, not an object; each document must be an object with a {text_field!r} "
                "field")
    if text_field not in doc:
        return (f"no field {text_field!r} (fields found: {', '.join(map(str, doc)) or 'none'}); set data.text_field "
                "to the field holding the text")
    if not isinstance(doc[text_field], str):
        return (f"field {text_field!r} holds a JSON {_json_kind(doc[text_field])}, not text; every document needs "
                "its text there")
    return None


def _first_byte(path: str) -> bytes:
    with open(path, "rb") as f:
        while chunk := f.read(4096):
            if chunk.strip():
                return chunk.strip()[:1]
    return b""


def json_records(path: str, each_line: str) -> Iterator[tuple[str, object]]:
    """(location, parsed record) of a JSON lines file or a JSON array: `FILE:LINE`, or `FILE: array element I`. A line
    that is not JSON is a ValueError naming it and saying what `each_line` must be. Expects `check_text_bytes`
    passed."""
    if _first_byte(path) == b"[":  # an array is one JSON value: parsed whole, as `datasets` does
        with open(path, encoding="utf-8") as f:
            try:
                records = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{e.lineno}: not JSON ({e.msg}, column {e.colno})") from None
        for i, record in enumerate(records):
            yield f"{path}: array element {i}", record
        return
    with open(path, encoding="utf-8", newline="\n") as f:  # lines end at b"\n" only, as counted by check_text_bytes
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line.rstrip("\r\n"))  # a torn last line: "unterminated string", not "control char"
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{number}: not JSON ({e.msg}, column {e.colno}); each line must be "
                                 f"{each_line}") from None
            yield f"{path}:{number}", record


def check_json_documents(path: str, text_field: str) -> int:
    """Each document of a JSON lines file (or JSON array) is an object whose `text_field` is a string; returns the
    number of documents. A ValueError names the first bad line (or array element). Expects `check_text_bytes` passed."""
    count = 0
    for where, doc in json_records(path, f"one JSON object with a {text_field!r} field"):
        problem = _document_problem(doc, text_field)
        if problem:
            raise ValueError(f"{where}: {problem}")
        count += 1
    return count


def _check_text_column(path: str, columns: dict[str, str], text_field: str) -> None:
    """`columns`: name -> type as Arrow prints it (the schema only, no rows read)."""
    if text_field not in columns:
        raise ValueError(f"{path}: no field {text_field!r} (fields found: {', '.join(columns)}); set text_field to the "
                         "one holding the text")
    if columns[text_field] not in _TEXT_TYPES:
        raise ValueError(f"{path}: field {text_field!r} holds {columns[text_field]}, not text")


def _check_parquet(path: str, text_field: str) -> None:
    import pyarrow.parquet as pq  # noqa: PLC0415

    try:
        schema = pq.read_schema(path)
    except Exception as e:  # pyarrow raises ArrowInvalid, OSError...
        raise ValueError(f"{path}: cannot be read as parquet ({_root_cause(e)})") from e
    _check_text_column(path, {f.name: str(f.type) for f in schema}, text_field)
    if _num_parquet_rows(path) == 0:
        raise ValueError(f"{path}: no documents (0 rows)")


def _check_file(file: DataFile, text_field: str) -> None:
    if file.kind == "text":
        TextFileSource(file.path)
        check_text_bytes(file.path)
    elif file.kind == "json":
        check_text_bytes(file.path)
        if check_json_documents(file.path, text_field) == 0:
            raise ValueError(f"{file.path}: no documents (the file is empty)")
    elif file.kind == "parquet":
        _check_parquet(file.path, text_field)
    else:  # memory-mapped: opening reads the schema and Arrow's stored null counts, no rows
        open_source(file, text_field, None)


def _file_stamp(path: str, text_field: str) -> list:
    """What must be unchanged for an earlier check of a file to still hold (a folder: a saved dataset's path)."""
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns, text_field]


def _read_checked(memo: str | None) -> dict:
    if memo is None:
        return {}
    try:
        with open(memo) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def check_corpus(paths: Sequence[str], text_field: str = "text", cache_dir: str | None = None,
                 key: str = "data.paths", memo: str | None = None) -> None:
    """Check every data file of `paths` before training: what `open_corpus` checks, plus binary content (NUL bytes,
    invalid UTF-8) and every JSON document's text field, named by file and line. Reads text files once and JSON files
    twice (bytes, then documents), sequentially; parquet files and saved datasets only by their schema.
    `memo`: a JSON file recording the files that passed (size, modification time, text field): a restart of a long
    run re-reads only new or changed files, not a whole corpus each time.

    Raises:
        ConfigError: `<key>: FILE[:LINE]: what is wrong; how to fix it`, for the first problem found.
    """
    checked = _read_checked(memo)
    passed: dict[str, list] = {}
    try:
        for file in find_data_files(paths, cache_dir):
            path = os.path.abspath(file.path)
            stamp = _file_stamp(file.path, text_field)
            if checked.get(path) != stamp:
                _check_file(file, text_field)
            passed[path] = stamp
    except ConfigError:
        raise
    except (ValueError, OSError) as e:
        raise ConfigError(f"{key}: {e}") from None
    if memo is not None and passed:
        os.makedirs(os.path.dirname(memo) or ".", exist_ok=True)
        tmp = f"{memo}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump({**checked, **passed}, f)
        os.replace(tmp, memo)


# ----------------------------------------------------------------------------------------------------------- opening


class TextFileSource:
    """One .txt/.md file = one document, read on demand (UTF-8 without NUL bytes, else a ValueError naming the line:
    a binary file must not train silently, even when `check_corpus` was not run)."""

    num_docs = 1

    def __init__(self, path: str):
        if os.path.getsize(path) == 0:
            raise ValueError(f"{path}: no documents (the file is empty)")
        self.path = path

    def texts(self, rows: Sequence[int]) -> list[str]:
        with open(self.path, "rb") as f:
            data = f.read()
        try:
            text = data.decode("utf-8")
            bad = "\x00" in text
        except UnicodeDecodeError:
            text, bad = "", True
        if bad:
            check_text_bytes(self.path)  # raises, naming the line
            raise ValueError(f"{self.path}: changed while being read; restart once the corpus is complete")
        return [text for _ in rows]


class ArrowSource:
    """The rows of one memory-mapped `datasets.Dataset`, reduced to its text column. `text_file`: `path` is a JSON
    file, whose bytes `check_text_bytes` can name by line (Arrow's JSON reader keeps invalid UTF-8 as it is, so it
    surfaces only when a row is read)."""

    def __init__(self, path: str, dataset: datasets.Dataset, text_field: str, text_file: bool = False):
        if dataset.num_rows == 0:
            raise ValueError(f"{path}: no documents (0 rows)")
        _check_text_column(path, {name: getattr(feature, "dtype", str(feature))
                                  for name, feature in dataset.features.items()}, text_field)
        dataset = dataset.select_columns([text_field])
        column = dataset.data.column(text_field)
        if column.null_count:
            import pyarrow.compute as pc  # noqa: PLC0415

            first = pc.index(pc.is_null(column), True).as_py()
            raise ValueError(f"{path}: {column.null_count} of {dataset.num_rows} rows have no {text_field!r} "
                             f"(first at row {first})")
        self.path, self.dataset, self.text_field, self.text_file = path, dataset, text_field, text_file
        self.num_docs = dataset.num_rows

    def texts(self, rows: Sequence[int]) -> list[str]:
        try:
            return self.dataset[[int(r) for r in rows]][self.text_field]
        except UnicodeDecodeError:
            self._explain_undecodable(rows)
            raise

    def _explain_undecodable(self, rows: Sequence[int]) -> None:
        if self.text_file:
            check_text_bytes(self.path)  # raises, naming the line
        for row in rows:
            try:
                self.dataset[int(row)]
            except UnicodeDecodeError:
                raise ValueError(f"{self.path}: row {row}: field {self.text_field!r} is not valid UTF-8; re-encode "
                                 "the data as UTF-8") from None


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
    try:
        return ArrowSource(file.path, _load_dataset(file, cache_dir), text_field, text_file=file.kind == "json")
    except ValueError:
        if file.kind == "json":  # name the line to blame, when one is: datasets' own message cannot
            check_text_bytes(file.path)
            check_json_documents(file.path, text_field)
        raise


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


def open_corpus(paths: Sequence[str], text_field: str = "text", cache_dir: str | None = None,
                key: str = "data.paths") -> Corpus:
    """Find, open and check every data file of `paths`; errors are one line naming the file (a bad file's content:
    a ConfigError `<key>: FILE[:LINE]: ...`, as from `check_corpus`; a missing path: FileNotFoundError)."""
    files = find_data_files(paths, cache_dir)
    try:
        return Corpus([open_source(f, text_field, cache_dir) for f in files])
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(f"{key}: {e}") from None
