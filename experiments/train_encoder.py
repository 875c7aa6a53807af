"""Trains the encoder-only coarse level (issue 19) on the shared EM stacks; same flags as
`jaxalign train --recipe=encoder`. The shipped `jaxalign/models/weights/encoder32.*` were made with
(2-core CPU VM shared with other jobs, no GPU; see jaxalign/models/weights/README.md)::

  nohup nice -n 10 python experiments/train_encoder.py --workdir=/tmp/jaxalign_enc32b --steps=6000 \
      --eval_every=500 --checkpoint_every=250 --export=jaxalign/models/weights/encoder32 > /tmp/enc.log 2>&1 &

Rerunning the same command resumes from the latest checkpoint of --workdir.
"""

from __future__ import annotations

from absl import app, flags

from jaxalign.commands.train import main

if __name__ == "__main__":
  flags.FLAGS.set_default("recipe", "encoder")
  app.run(main)
