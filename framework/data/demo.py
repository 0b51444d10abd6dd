"""The embedded demo corpus: English text built locally from the docstrings of Python's standard library.

Owns: `build_demo_corpus`, which writes (once per cache directory and Python version) a JSON lines file of about 1 MB
that `PackedDataLoader` reads like any other data. Nothing is downloaded and nothing is imported: the sources of a
fixed, sorted list of pure-Python standard library modules are parsed with `ast`, and every public top-level function,
class (with its documented methods) and module docstring becomes one document, headed by its signature. The text is
deterministic for a given Python version (it changes only as far as the library's docstrings do). Does not own the
demo tokenizer (`tools/build_demo_tokenizer.py` trains it on this corpus; it ships in `framework/assets/tokenizer`).
"""

from __future__ import annotations

import ast
import json
import os
import sys
import sysconfig
from collections.abc import Iterator

CORPUS_VERSION = 1
# Pure-Python modules with plenty of prose, present in Python 3.10 - 3.14 (a missing one is skipped).
DEMO_MODULES = (
    "abc", "argparse", "ast", "base64", "bdb", "bisect", "calendar", "cmd", "codecs", "collections",
    "concurrent.futures._base", "configparser", "contextlib", "copy", "csv", "dataclasses", "datetime", "difflib",
    "dis", "doctest", "email.message", "email.utils", "enum", "filecmp", "fnmatch", "fractions", "ftplib",
    "functools", "getopt", "gettext", "glob", "gzip", "hashlib", "heapq", "hmac", "html", "http.client",
    "http.cookiejar", "http.server", "imaplib", "inspect", "ipaddress", "json", "json.decoder", "json.encoder",
    "logging", "logging.handlers", "mailbox", "mimetypes", "numbers", "operator", "optparse", "os", "pathlib",
    "pdb", "pickle", "pickletools", "pkgutil", "platform", "plistlib", "poplib", "pprint", "profile", "pstats",
    "queue", "random", "re", "reprlib", "sched", "secrets", "selectors", "shlex", "shutil", "smtplib", "socket",
    "socketserver", "statistics", "string", "subprocess", "tarfile", "tempfile", "textwrap", "threading", "timeit",
    "tokenize", "trace", "traceback", "turtle", "types", "typing", "unittest.case", "urllib.parse",
    "urllib.request", "uuid", "warnings", "wave", "weakref", "xml.dom.minidom", "zipfile", "zipimport",
)


def _module_source(name: str, stdlib: str) -> str | None:
    base = os.path.join(stdlib, *name.split("."))
    for path in (base + ".py", os.path.join(base, "__init__.py")):
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                return f.read()
    return None


def _signature(node: ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) -> str:
    if isinstance(node, ast.ClassDef):
        bases = ", ".join(ast.unparse(b) for b in node.bases)
        return f"class {node.name}({bases}):" if bases else f"class {node.name}:"
    prefix = "async def" if isinstance(node, ast.AsyncFunctionDef) else "def"
    return f"{prefix} {node.name}({ast.unparse(node.args)}):"


def _is_public(name: str) -> bool:
    return not name.startswith("_") or (name.startswith("__") and name.endswith("__"))


def _definition_text(node: ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) -> str | None:
    parts = []
    doc = ast.get_docstring(node)
    if doc:
        parts.append(f"{_signature(node)}\n{doc}")
    if isinstance(node, ast.ClassDef):
        for child in node.body:
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) and _is_public(child.name):
                child_doc = ast.get_docstring(child)
                if child_doc:
                    parts.append(f"{_signature(child)}\n{child_doc}")
        if parts and not doc:
            parts.insert(0, _signature(node))
    return "\n\n".join(parts) or None


def module_documents(name: str, source: str) -> Iterator[dict]:
    """One document for the module docstring, one per public top-level function or class that has documentation."""
    tree = ast.parse(source)
    doc = ast.get_docstring(tree)
    if doc:
        yield {"text": f"Module {name}.\n\n{doc}", "source": name}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
            text = _definition_text(node)
            if text:
                yield {"text": text, "source": f"{name}.{node.name}"}


def demo_documents() -> Iterator[dict]:
    """The demo corpus's documents ({"text", "source"}), in a fixed order."""
    stdlib = sysconfig.get_paths()["stdlib"]
    for name in sorted(DEMO_MODULES):
        source = _module_source(name, stdlib)
        if source is not None:
            yield from module_documents(name, source)


def demo_corpus_path(cache_dir: str) -> str:
    return os.path.join(cache_dir, f"demo_corpus-py{sys.version_info[0]}{sys.version_info[1]}-v{CORPUS_VERSION}.jsonl")


def build_demo_corpus(cache_dir: str) -> str:
    """Write the demo corpus into `cache_dir` unless it is there already; return its path (a .jsonl file).

    The file is written under a temporary name and renamed, so concurrent callers (one per rank) and interrupted runs
    never leave a partial corpus under the final name.

    Raises:
        RuntimeError: the standard library sources are not installed (no document could be built).
    """
    path = demo_corpus_path(cache_dir)
    if os.path.isfile(path):
        return path
    os.makedirs(cache_dir, exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    count = 0
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for doc in demo_documents():
                f.write(json.dumps(doc, ensure_ascii=False) + "\n")
                count += 1
        if count == 0:
            raise RuntimeError(f"no standard library sources found under {sysconfig.get_paths()['stdlib']}; "
                               f"the demo corpus needs them (pass your own data paths instead)")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path
