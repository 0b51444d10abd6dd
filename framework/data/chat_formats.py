"""Chat records -> messages: the three layouts chat datasets come in, reduced to one list of {role, content, ...}.

Owns: reading one record (a JSON object, a parquet / Arrow row) as a conversation in the `messages` layout (OpenAI /
Hugging Face: `[{"role", "content", ...}]`, roles system, user, assistant, tool), ShareGPT (`conversations` of
`{"from", "value"}`) or Alpaca (`instruction`, `input`, `output`), with every field name configurable, and the checks
on it (a missing field, an unknown role, content that is not text), each a one-line `ChatFormatError` that the caller
prefixes with the file and line. Does not own rendering (`chat_template.py`) or files (`chat_dataset.py`).

Keys other than role and content (`tool_calls`, `reasoning_content`, `name`, `tool_call_id`) are kept as they are, so
the checkpoint's own chat template renders them the way it was released; keys holding null are dropped (parquet and
Arrow fill every struct field of every message, and templates test `is defined`, not `is none`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

ROLES = ("system", "user", "assistant", "tool")
# ShareGPT speakers as written by the datasets in the wild -> our roles
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "model": "assistant", "tool": "tool", "function": "tool",
                  "observation": "tool"}
FORMATS = ("auto", "messages", "sharegpt", "alpaca")


class ChatFormatError(ValueError):
    """One record is not a conversation in the configured layout; the message says what and how to fix it."""


@dataclass(frozen=True)
class ChatFields:
    """Which layout records are in and the field names of each (the `chat` config section)."""

    format: str = "auto"
    messages_field: str = "messages"
    role_field: str = "role"
    content_field: str = "content"
    conversations_field: str = "conversations"
    from_field: str = "from"
    value_field: str = "value"
    instruction_field: str = "instruction"
    input_field: str = "input"
    output_field: str = "output"
    system_field: str = "system"


def _kind(value: object) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def detect_format(record: dict, fields: ChatFields) -> str:
    if fields.format != "auto":
        return fields.format
    for name, field in (("messages", fields.messages_field), ("sharegpt", fields.conversations_field),
                        ("alpaca", fields.instruction_field)):
        if field in record:
            return name
    raise ChatFormatError(f"no {fields.messages_field!r}, {fields.conversations_field!r} or "
                          f"{fields.instruction_field!r} field (fields found: {', '.join(map(str, record)) or 'none'});"
                          " set chat.format and the chat.*_field names to your layout")


def _text(value: object, where: str, allow_none: bool = False) -> str | None:
    if value is None and allow_none:
        return None
    if not isinstance(value, str):
        raise ChatFormatError(f"{where} is a {_kind(value)}, expected text")
    return value


def _from_messages(items: object, fields: ChatFields) -> list[dict[str, Any]]:
    if not isinstance(items, list):
        raise ChatFormatError(f"field {fields.messages_field!r} is a {_kind(items)}, expected an array of messages")
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise ChatFormatError(f"message {i} is a {_kind(item)}, expected an object with "
                                  f"{fields.role_field!r} and {fields.content_field!r}")
        role = item.get(fields.role_field)
        if role not in ROLES:
            raise ChatFormatError(f"message {i}: unknown role {role!r}; expected one of {', '.join(ROLES)} "
                                  f"(field {fields.role_field!r})")
        # an assistant message that only calls tools may carry no content
        content = _text(item.get(fields.content_field), f"message {i} ({role}) field {fields.content_field!r}",
                        allow_none=role == "assistant" and bool(item.get("tool_calls")))
        message = {k: v for k, v in item.items()
                   if v is not None and k not in (fields.role_field, fields.content_field)}
        message.update(role=role, content=content if content is not None else "")
        out.append(message)
    return out


def _from_sharegpt(record: dict, fields: ChatFields) -> list[dict[str, Any]]:
    items = record.get(fields.conversations_field)
    if not isinstance(items, list):
        raise ChatFormatError(f"field {fields.conversations_field!r} is a {_kind(items)}, expected an array of turns")
    out = []
    system = record.get(fields.system_field)
    if isinstance(system, str) and system:
        out.append({"role": "system", "content": system})
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise ChatFormatError(f"turn {i} is a {_kind(item)}, expected an object with {fields.from_field!r} and "
                                  f"{fields.value_field!r}")
        speaker = item.get(fields.from_field)
        role = SHAREGPT_ROLES.get(speaker) if isinstance(speaker, str) else None
        if role is None:
            raise ChatFormatError(f"turn {i}: unknown role {speaker!r} in field {fields.from_field!r}; expected one "
                                  f"of {', '.join(SHAREGPT_ROLES)}")
        out.append({"role": role, "content": _text(item.get(fields.value_field),
                                                   f"turn {i} field {fields.value_field!r}")})
    return out


def _from_alpaca(record: dict, fields: ChatFields) -> list[dict[str, Any]]:
    instruction = _text(record.get(fields.instruction_field), f"field {fields.instruction_field!r}")
    extra = record.get(fields.input_field)
    extra = _text(extra, f"field {fields.input_field!r}") if extra is not None else ""
    output = _text(record.get(fields.output_field), f"field {fields.output_field!r}")
    out = []
    system = record.get(fields.system_field)
    if isinstance(system, str) and system:
        out.append({"role": "system", "content": system})
    out.append({"role": "user", "content": f"{instruction}\n\n{extra}" if extra else instruction})
    out.append({"role": "assistant", "content": output})
    return out


def to_messages(record: object, fields: ChatFields) -> list[dict[str, Any]]:
    """The conversation in `record` as messages; ChatFormatError (one line, no location) when it is not one."""
    if not isinstance(record, dict):
        raise ChatFormatError(f"a JSON {_kind(record)}, not an object; each conversation must be an object")
    fmt = detect_format(record, fields)
    if fmt == "messages":
        if fields.messages_field not in record:
            raise ChatFormatError(f"no field {fields.messages_field!r} (fields found: {', '.join(map(str, record))});"
                                  " set chat.messages_field")
        messages = _from_messages(record[fields.messages_field], fields)
    elif fmt == "sharegpt":
        messages = _from_sharegpt(record, fields)
    else:
        messages = _from_alpaca(record, fields)
    if not messages:
        raise ChatFormatError("the conversation has no messages")
    return messages
