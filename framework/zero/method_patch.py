"""Replacing a method of one of DeepSpeed's ZeRO optimizer classes, with DeepSpeed's own kept at hand.

DeepSpeed builds its ZeRO optimizers inside deepspeed.initialize with no hook for the choices framework/zero/
optimizer_step.py and framework/zero/local_grads.py make, so they replace methods on the classes, once per process,
before any engine exists.
"""

from __future__ import annotations

import functools
from typing import Any, Callable


def replace_method(cls: type, name: str, replacement: Callable[..., Any]) -> None:
    """`cls.name(self, ...)` becomes `replacement(original, self, ...)`, where `original` is the method it replaces
    (also kept as the new method's `__wrapped__`). Idempotent: a method this replacement already wraps stays as it is,
    so every engine built in a process may install the same changes."""
    original = getattr(cls, name)
    if getattr(original, "_replaced_by", None) is replacement:
        return

    @functools.wraps(original)
    def method(self, *args, **kwargs):
        return replacement(original, self, *args, **kwargs)

    method._replaced_by = replacement
    setattr(cls, name, method)
