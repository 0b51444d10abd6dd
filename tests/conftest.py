import gc

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run tests/gpu on an H100/H200)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_collection_finish(session):
    # Collecting imported torch, transformers, DeepSpeed and the framework into this process: several hundred
    # thousand long-lived objects that every later full collection would walk again, test after test. Frozen, those
    # collections only look at what the tests themselves allocate.
    gc.freeze()
