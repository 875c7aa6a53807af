"""`jaxalign train`: train a SEAMLeSS pyramid (all levels, coarse to fine) self-supervised.

Example (the shipped default weights; see jaxalign/models/weights/README.md)::

  jaxalign train --workdir=/tmp/jaxalign_train2 --mips=2,0 --gammas=10,5 --stage1_epochs=3 \
      --stage2_epochs=2 --learning_rate=0.003 --batch_size=4 --export=jaxalign/models/weights/default

Re-running the same command with the same --workdir resumes from the latest checkpoint.

`--recipe=encoder` trains one encoder-only level at `--nm` (default 32 nm) with the known-warp loss
(issue 19; `jaxalign.models.train_encoder.train_encoder`), whose encodings the Online Field Finetuner aligns::

  jaxalign train --recipe=encoder --workdir=/tmp/jaxalign_enc32 --steps=6000 --eval_every=500 \
      --checkpoint_every=250 --export=jaxalign/models/weights/encoder32

Progress bar with loss, validation EPE and ETA; metrics.jsonl (and TensorBoard events when
tensorboardX is installed); SIGTERM/Ctrl-C checkpoint the current step, and the same command resumes.
"""

from __future__ import annotations

from absl import flags, logging

from jaxalign.models import train_flags

train_flags.define_flags(flags)
FLAGS = flags.FLAGS


def main(argv):
  del argv
  res = train_flags.main_from_flags(FLAGS)
  logging.info("trained to step %d; weights %s; metrics %s", res.step, res.weights_path, res.metrics_path)
  print(f"step {res.step}  weights {res.weights_path}  metrics {res.metrics_path}")
