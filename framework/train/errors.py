"""Errors the training loop stops with; launch/pretrain.py prints them as one line and exits 1. No heavy imports:
the launcher imports this before torch."""


class NonFiniteLoss(RuntimeError):
    """The training loss became nan or inf (train.stop_on_nonfinite_loss)."""
