"""The script folders must not shadow the packages their scripts import.

`python benchmarks/x.py` puts benchmarks/ first on sys.path, so a file there named like a dependency is imported in
its place: benchmarks/grouped_gemm.py once made every benchmark's `import grouped_gemm` (MegaBlocks' GEMM) load the
benchmark script instead, and the MegaBlocks rows failed with "module 'grouped_gemm' has no attribute 'backend'".
"""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# what the framework, its scripts and the GPU extras import at top level
DEPENDENCIES = {"deepspeed", "framework", "grouped_gemm", "huggingface_hub", "megablocks", "numpy", "pydantic",
                "safetensors", "stk", "tensorboard", "tokenizers", "torch", "tqdm", "transformers", "triton", "yaml"}


@pytest.mark.parametrize("folder", ["benchmarks", "launch", "tools"])
def test_no_script_is_named_like_a_dependency(folder):
    names = {p.stem for p in (ROOT / folder).iterdir() if p.suffix == ".py" or p.is_dir()}
    shadowing = sorted(names & DEPENDENCIES)
    assert not shadowing, f"{folder}/ holds {shadowing}: rename them, they shadow the packages of those names"
