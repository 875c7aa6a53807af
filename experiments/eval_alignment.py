"""Runs aligners on a ground-truth case and prints one table row per method.

  python experiments/eval_alignment.py --case=same --stack=isbi2012_train --num=6 --crop=512 \
      --method=identity,blockmatch,finetuner
  python experiments/eval_alignment.py --case=neighbour --stack=flyem_medulla_fibsem --num=8 --crop=512

Neighbour and stack cases default to `flyem_medulla_fibsem` every 4th slice (40 nm sections at
10 nm/px: FIB-SEM slices are intrinsically aligned, so the ground truth is exact). Methods are resolved
by name; a method whose module does not import yet is skipped with a warning.
"""

from __future__ import annotations

import importlib
import json
import pathlib
import sys

from absl import app, flags, logging

FLAGS = flags.FLAGS
flags.DEFINE_enum("case", "same", ["same", "neighbour", "stack"], "case type")
flags.DEFINE_string("stack", None, "shared stack (default: isbi2012_train for same, flyem_medulla_fibsem otherwise)")
flags.DEFINE_integer("num", 6, "sections taken from the stack (pairs = num - 1)")
flags.DEFINE_integer("step", None, "take every step-th slice (default 4 for FIB-SEM neighbour/stack, else 1)")
flags.DEFINE_integer("crop", 512, "centre crop in px (0 = whole sections)")
flags.DEFINE_integer("seed", 0, "distortion seed")
flags.DEFINE_list("method", ["identity", "blockmatch", "finetuner"], "methods to run (see METHODS)")
flags.DEFINE_string("case_dir", None, "load the case from this directory if it exists, else build and save it there")
flags.DEFINE_integer("cpc_level", 1, "CPC after 2**level downsampling")
flags.DEFINE_integer("cpc_chunk", 32, "CPC chunk side (px at cpc_level)")
flags.DEFINE_string("volume", None, "build the case from this jaxalign.volume.store image volume instead of a shared stack")
flags.DEFINE_string("write_distorted", None, "stack cases: write the distorted stack to this volume URL "
                    "(and its defects to URL_defects) for `jaxalign align`")
flags.DEFINE_string("output_json", None, "append the rows (JSON lines) to this file")

# name -> (module, attribute, keyword arguments, kind): kind "pair" = team aligner protocol,
# "stack" = fn(sections, *, defects) -> fields (stack cases only)
METHODS = {
  "identity": ("jaxalign.bench.evaluation", "identity_aligner", {}, "pair"),
  "blockmatch": ("jaxalign.align.blockmatch", "block_match", {}, "pair"),
  "finetuner": ("jaxalign.align.pair", "align_pair", {}, "pair"),
  "finetuner_bm": ("jaxalign.align.pair", "align_pair", {"config": ("jaxalign.align.pair", "PairConfig", {"init": "blockmatch"})},
                   "pair"),
  # the finetuner with the elastic term not zeroed at cracks/folds (defect masks still given)
  "finetuner_nomask": ("jaxalign.align.pair", "align_pair",
                       {"config": ("jaxalign.align.pair", "PairConfig", {"mask_elastic_at_defects": False})}, "pair"),
  # the finetuner without any defect masks
  "finetuner_nodefects": ("jaxalign.align.pair", "align_pair", {"drop_defects": True}, "pair"),
  "block": ("jaxalign.stack.block", "align_block", {}, "stack"),
}


def resolve(name: str):
  """Returns (callable, kind) for a method name, or None (with a warning) if it cannot be imported."""
  if name not in METHODS:
    raise app.UsageError(f"unknown method {name!r}; known: {', '.join(METHODS)}")
  module, attr, kwargs, kind = METHODS[name]
  try:
    fn = getattr(importlib.import_module(module), attr)
    kwargs = dict(kwargs)
    drop = kwargs.pop("drop_defects", False)
    for k, v in list(kwargs.items()):
      if isinstance(v, tuple):  # (module, class, kwargs): a config built on demand
        kwargs[k] = getattr(importlib.import_module(v[0]), v[1])(**v[2])
  except (ImportError, AttributeError, TypeError) as e:
    logging.warning("skipping method %s: %s", name, e)
    return None
  if kind == "stack":
    def stack_fn(sections, *, defects=None):
      return fn(sections, defects=defects, progress=False, **kwargs)
    return stack_fn, kind

  def pair_fn(src, tgt, *, init_field=None, src_defects=None, tgt_defects=None):
    if drop:
      src_defects = tgt_defects = None
    return fn(src, tgt, init_field=init_field, src_defects=src_defects, tgt_defects=tgt_defects, **kwargs)
  return pair_fn, kind


def main(argv):
  del argv
  from jaxalign.bench import evaluation as ev
  stack = FLAGS.stack or ("isbi2012_train" if FLAGS.case == "same" else "flyem_medulla_fibsem")
  case_dir = pathlib.Path(FLAGS.case_dir) if FLAGS.case_dir else None
  if case_dir is not None and (case_dir / "case.json").exists():
    case = ev.load_case(case_dir)
    logging.info("loaded case %s", case_dir)
  elif FLAGS.volume:
    case = ev.case_from_volume(FLAGS.case, FLAGS.volume, num=FLAGS.num, step=FLAGS.step or 1, seed=FLAGS.seed)
    if case_dir is not None:
      ev.save_case(case, case_dir)
  else:
    case = ev.shared_case(FLAGS.case, stack, num=FLAGS.num, step=FLAGS.step, crop=FLAGS.crop or None,
                          seed=FLAGS.seed)
    if case_dir is not None:
      ev.save_case(case, case_dir)
  if FLAGS.write_distorted:
    ev.write_distorted_volume(case, FLAGS.write_distorted)
    logging.info("wrote the distorted stack to %s", FLAGS.write_distorted)
  config = ev.EvalConfig(cpc_level=FLAGS.cpc_level, cpc_chunk=FLAGS.cpc_chunk)
  rows = []
  for name in FLAGS.method:
    resolved = resolve(name)
    if resolved is None:
      continue
    fn, kind = resolved
    if kind == "stack" and case.kind != "stack":
      logging.warning("skipping %s: a stack method needs --case=stack", name)
      continue
    row = ev.evaluate(fn, case, name=name, stack_aligner=kind == "stack", config=config)
    rows.append(row)
    logging.info("%s", row)
  res = case.meta.get("resolution_nm", ["?", "?", "?"])
  print(f"case={case.kind} stack={case.meta.get('stack')} pairs={len(case)} shape={case.src.shape[1:]} "
        f"seed={case.meta.get('distortion', {}).get('seed')} resolution(z,y,x)={res} nm; "
        f"CPC: chunks of {config.cpc_chunk} px after {2 ** config.cpc_level}x downsampling, threshold {config.cpc_threshold}")
  print(ev.format_table(rows))
  if FLAGS.output_json:
    with open(FLAGS.output_json, "a") as f:
      for r in rows:
        f.write(json.dumps(dict(r, num=FLAGS.num, crop=FLAGS.crop, seed=FLAGS.seed)) + "\n")
  return 0


if __name__ == "__main__":
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
  app.run(main)
