"""The embedded fine-tuning demo's chat dataset: conversations about Python's standard library, built locally.

Owns: `build_demo_chat`, which writes (once per cache directory and Python version) a JSON lines file in the
`messages` layout from the same documents as the pretraining demo corpus (framework/data/demo.py: docstrings of a
fixed list of standard library modules; nothing downloaded, nothing imported). Each conversation asks what a function
or class does and gets the first paragraph of its docstring; every third one has a system message and every fourth a
second turn asking for the signature, so the demo exercises system prompts and multi-turn labels.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator

from framework.data.demo import demo_documents

CHAT_VERSION = 1
SYSTEM = "You answer questions about the Python standard library in one short paragraph."


def _first_paragraph(doc: str, limit: int = 320) -> str:
    text = " ".join(doc.strip().split("\n\n")[0].split())
    return text if len(text) <= limit else text[:limit].rsplit(" ", 1)[0] + " ..."


def demo_conversations() -> Iterator[dict]:
    """{"messages": [...]} per documented function or class of the demo corpus, in a fixed order."""
    k = 0
    for doc in demo_documents():
        if doc["text"].startswith("Module "):
            continue
        signature, _, body = doc["text"].partition("\n")
        answer = _first_paragraph(body)
        if not answer:
            continue
        messages = [{"role": "system", "content": SYSTEM}] if k % 3 == 0 else []
        messages += [{"role": "user", "content": f"What does {doc['source']} do?"},
                     {"role": "assistant", "content": answer}]
        if k % 4 == 0:
            messages += [{"role": "user", "content": "What is its signature?"},
                         {"role": "assistant", "content": signature.rstrip(":")}]
        k += 1
        yield {"messages": messages}


def demo_chat_path(cache_dir: str) -> str:
    return os.path.join(cache_dir, f"demo_chat-py{sys.version_info[0]}{sys.version_info[1]}-v{CHAT_VERSION}.jsonl")


def build_demo_chat(cache_dir: str) -> str:
    """Write the demo chat dataset into `cache_dir` unless it is there already; return its path (a .jsonl file).
    Written under a temporary name and renamed (concurrent callers, interrupted runs)."""
    path = demo_chat_path(cache_dir)
    if os.path.isfile(path):
        return path
    os.makedirs(cache_dir, exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        count = 0
        with open(tmp, "w", encoding="utf-8") as f:
            for conversation in demo_conversations():
                f.write(json.dumps(conversation, ensure_ascii=False) + "\n")
                count += 1
        if count == 0:
            raise RuntimeError("no standard library sources found: the demo chat dataset needs them (pass your own "
                               "data.paths instead)")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path
