"""Package attributes imported on first use (PEP 562), so that importing a package does not import its heaviest code.

Why: `framework/__init__.py` used to import the model code, and through it transformers' modeling modules (~3 s of a
process start on a CPU machine), so `import framework.cluster`, `launch/pretrain.py --help`, a configuration error and
the tools paid for models they never build. `framework.load_model`, `framework.MoECausalLM` and the rest still work
and are the same objects; their modules are imported when one of them is first read.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_exports(namespace: dict[str, Any], exports: dict[str, str]
                 ) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The `__getattr__` and `__dir__` of the package whose globals are `namespace`: `exports` maps each public name
    to the module that defines it. A name read once is stored in the package, so later reads are plain lookups."""
    package = namespace["__name__"]

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(exports))

    return __getattr__, __dir__
