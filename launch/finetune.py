"""Supervised fine-tuning on conversations: launch/pretrain.py's run (the same config sections, checks, trainer,
checkpoints, resume, metrics and export) on chat data, with the loss on the assistant's tokens only.

    deepspeed [--hostfile H] [--num_gpus N] launch/finetune.py [--config X.yaml] [--deepspeed Y.json]
              [--resume auto|CHECKPOINT] [section.key=value ...]
    python launch/finetune.py --hostfile H [--num_gpus N] ...   # checks hostfile and config, then runs the line above
    python launch/finetune.py                                   # the demo: model_configs/finetune_demo.yaml

Data (data.paths): JSON lines / JSON / parquet / datasets.save_to_disk with one conversation per record, as
`messages` (role/content: system, user, assistant, tool), ShareGPT (`conversations` of from/value) or Alpaca
(instruction/input/output); the `chat` section names the fields, which assistant turns are learnt (chat.loss_on) and
what happens to conversations longer than data.seq_len (chat.overlong). Conversations are rendered with the
tokenizer's own chat template (model.path's, or chat.template), packed into rows with attention inside each one.
A conversation the data or the template cannot take (a missing field, an unknown role, a template error), or data with
no assistant message at all, stops every process before any work with one line naming the file and line (exit 2).
"""

from __future__ import annotations

import gc
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # run from a checkout without installing

from framework.cluster.process_exit import exit_without_teardown  # noqa: E402
from launch.pretrain import main  # noqa: E402

DEMO_CONFIG = os.path.join(REPO, "model_configs", "finetune_demo.yaml")

if __name__ == "__main__":
    gc.disable()  # for the imports only: see launch/pretrain.py
    exit_without_teardown(main(task="finetune", script=__file__, demo_config=DEMO_CONFIG, doc=__doc__,
                               gc_paused=True))
