"""Trains the default SEAMLeSS pyramid (all levels, coarse to fine) on the shared EM stacks.

Same flags as `jaxalign train`. The shipped weights were made with (2-core CPU VM, no GPU)::

  python experiments/train_pyramid.py --workdir=/tmp/jaxalign_train2 --mips=2,0 --gammas=10,5 \
      --stage1_epochs=3 --stage2_epochs=2 --learning_rate=0.003 --batch_size=4 \
      --eval_every=27 --checkpoint_every=27 --export=jaxalign/models/weights/default
"""

from __future__ import annotations

from absl import app

# The flags and the run are `jaxalign train`'s: one definition for the script and the command.
from jaxalign.commands.train import main

if __name__ == "__main__":
  app.run(main)
