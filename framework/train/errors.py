"""Errors a run stops with, each one line; launch/pretrain.py prints them as `error: ...`. No heavy imports: the
launcher imports this before torch.

Exit codes: 2 for what the user must change before running again (CheckpointError, like a config error: nothing was
trained); 1 for a run that started and stopped on a condition met while training (NonFiniteLoss, DiskFull,
CheckpointSaveFailed): the previous checkpoint is intact and the fix is to resume once the cause is dealt with."""


class NonFiniteLoss(RuntimeError):
    """The training loss became nan or inf (train.stop_on_nonfinite_loss)."""


class CheckpointError(Exception):
    """No usable checkpoint where the run was told to start (damaged, ambiguous, or a fresh run into a directory that
    already holds one). Exit 2."""


class DiskFull(RuntimeError):
    """Not enough free space for the next checkpoint; every rank stopped before writing it. Exit 1."""


class CheckpointSaveFailed(RuntimeError):
    """Writing a checkpoint failed (e.g. ENOSPC); its temporary directory was removed. Exit 1."""
