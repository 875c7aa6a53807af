"""absl flags shared by `jaxalign train` and experiments/train_pyramid.py: `define_flags` defines them,
`main_from_flags` runs pyramid (`jaxalign.models.train_pyramid.train`) or encoder
(`jaxalign.models.train_encoder.train_encoder`) training from them.
"""

from __future__ import annotations

from absl import logging

from jaxalign.errors import InputError
from jaxalign.models import seamless as models
from jaxalign.models.train_data import TrainConfig, validate_train_config
from jaxalign.models.train_encoder import EncoderTrainConfig, train_encoder, validate_encoder_config
from jaxalign.models.train_pyramid import TrainResult, train


# ----------------------------------------------------------------------------------------------
# absl flags shared by `jaxalign train` and experiments/train_pyramid.py
# ----------------------------------------------------------------------------------------------

def define_flags(flags_module) -> None:
  """Defines the training flags on `absl.flags` (call once, at import of the command module)."""
  f = flags_module
  d = TrainConfig()
  f.DEFINE_string("workdir", None, "output folder (checkpoints, metrics.jsonl, pyramid.{npz,json}); resumes if present")
  f.DEFINE_string("data_root", d.data_root, "folder with the shared EM stacks")
  f.DEFINE_list("stacks", [f"{n}:{s}" for n, s in d.stacks], "stack:stride pairs of training stacks")
  f.DEFINE_list("mips", [str(lv.mip) for lv in d.pyramid.levels], "MIP of each level, coarse first")
  f.DEFINE_integer("encoder_channels", d.pyramid.levels[0].encoder.channels, "encoder width")
  f.DEFINE_integer("encoder_blocks", d.pyramid.levels[0].encoder.blocks, "encoder residual blocks")
  f.DEFINE_integer("encoding_channels", d.pyramid.levels[0].encoder.out_channels, "C of the encodings")
  f.DEFINE_integer("aligner_channels", d.pyramid.levels[0].aligner.channels, "aligner width")
  f.DEFINE_integer("aligner_scales", d.pyramid.levels[0].aligner.scales, "aligner internal pyramid depth")
  f.DEFINE_integer("crop", d.crop, "training crop side (px of the level)")
  f.DEFINE_integer("batch_size", d.batch_size, "pairs per step")
  f.DEFINE_integer("variants", d.variants, "distorted copies of each training pair")
  f.DEFINE_integer("val_sections", d.val_sections, "sections held out at the end of each stack")
  f.DEFINE_integer("stage1_epochs", d.stage1_epochs, "stage-1 epochs per level (paper 100)")
  f.DEFINE_integer("stage2_epochs", d.stage2_epochs, "stage-2 epochs per level (paper 500)")
  f.DEFINE_float("learning_rate", d.learning_rate, "Adam learning rate")
  f.DEFINE_list("gammas", [str(g) for g in d.gammas], "elastic weight per level, coarse first (paper 5-25)")
  f.DEFINE_float("alpha", d.alpha, "stage-2 best-sample weight (paper 0.7)")
  f.DEFINE_integer("eval_every", d.eval_every, "validation EPE every N steps")
  f.DEFINE_integer("checkpoint_every", d.checkpoint_every, "checkpoint every N steps")
  f.DEFINE_integer("keep_last", d.keep_last, "checkpoints kept (plus the best)")
  f.DEFINE_integer("seed", d.seed, "random seed")
  f.DEFINE_integer("max_steps", None, "stop after this global step (resume later with the same command)")
  f.DEFINE_string("export", None, "also copy the final weights to this path prefix (e.g. jaxalign/models/weights/default)")
  # Encoder-only level (issue 19): `--recipe=encoder`. Shared flags (crop, batch_size, learning_rate,
  # encoder widths, eval/checkpoint cadence) take the encoder recipe's defaults unless given.
  e = EncoderTrainConfig()
  f.DEFINE_enum("recipe", "pyramid", ["pyramid", "encoder"],
                "pyramid: Encoder+Aligner levels, two-stage losses; encoder: one encoder-only level "
                "trained with the known-warp loss, aligned by the finetuner on its encodings")
  f.DEFINE_float("nm", e.nm, "encoder recipe: pixel size (nm) of the level")
  f.DEFINE_integer("encoding_levels", e.encoding_levels, "encoder recipe: coarser encoding reductions at inference")
  f.DEFINE_integer("steps", e.steps, "encoder recipe: total train steps")
  f.DEFINE_list("encoder_dilations", [str(d) for d in e.encoder.dilations],
                "encoder recipe: dilation of each residual block (one per block)")
  f.DEFINE_float("nce_weight", e.nce_weight, "encoder recipe: weight of the InfoNCE term")
  f.DEFINE_float("temperature", e.temperature, "encoder recipe: InfoNCE temperature")


def config_from_flags(FLAGS) -> TrainConfig:
  """TrainConfig from the flags of `define_flags`; InputError on malformed values."""
  try:
    stacks = []
    for item in FLAGS.stacks:
      name, _, stride = item.partition(":")
      stacks.append((name, int(stride or 1)))
    mips = [int(m) for m in FLAGS.mips]
    gammas = tuple(float(g) for g in FLAGS.gammas)
  except ValueError as e:
    raise InputError(f"bad --stacks/--mips/--gammas value ({e})") from None
  enc = models.EncoderConfig(channels=FLAGS.encoder_channels, blocks=FLAGS.encoder_blocks,
                             out_channels=FLAGS.encoding_channels)
  al = models.AlignerConfig(scales=FLAGS.aligner_scales, channels=FLAGS.aligner_channels)
  pyr = models.PyramidConfig(levels=tuple(models.LevelConfig(mip=m, encoder=enc, aligner=al,
                                                                    finetune=models.default_finetune(m)) for m in mips))
  cfg = TrainConfig(pyramid=pyr, data_root=FLAGS.data_root, stacks=tuple(stacks), val_sections=FLAGS.val_sections,
                    variants=FLAGS.variants, crop=FLAGS.crop, batch_size=FLAGS.batch_size,
                    stage1_epochs=FLAGS.stage1_epochs, stage2_epochs=FLAGS.stage2_epochs,
                    learning_rate=FLAGS.learning_rate, gammas=gammas, alpha=FLAGS.alpha,
                    eval_every=FLAGS.eval_every, checkpoint_every=FLAGS.checkpoint_every,
                    keep_last=FLAGS.keep_last, seed=FLAGS.seed)
  validate_train_config(cfg)
  return cfg


def encoder_config_from_flags(FLAGS) -> EncoderTrainConfig:
  """EncoderTrainConfig from the flags of `define_flags` (`--recipe=encoder`); InputError on bad values."""
  d = EncoderTrainConfig()
  given = lambda name, default: getattr(FLAGS, name) if FLAGS[name].present else default
  enc = models.EncoderConfig(channels=given("encoder_channels", d.encoder.channels),
                             blocks=given("encoder_blocks", d.encoder.blocks),
                             out_channels=given("encoding_channels", d.encoder.out_channels),
                             dilations=tuple(int(x) for x in FLAGS.encoder_dilations))
  cfg = EncoderTrainConfig(encoder=enc, nm=FLAGS.nm, encoding_levels=FLAGS.encoding_levels, data_root=FLAGS.data_root,
                           crop=given("crop", d.crop), batch_size=given("batch_size", d.batch_size),
                           steps=FLAGS.steps, learning_rate=given("learning_rate", d.learning_rate),
                           temperature=FLAGS.temperature, nce_weight=FLAGS.nce_weight,
                           eval_every=given("eval_every", d.eval_every),
                           checkpoint_every=given("checkpoint_every", d.checkpoint_every),
                           keep_last=FLAGS.keep_last, seed=FLAGS.seed)
  validate_encoder_config(cfg)
  return cfg


def main_from_flags(FLAGS) -> TrainResult:
  """Runs `train` (or `train_encoder` with `--recipe=encoder`) from parsed flags (shared by the CLI
  command and the experiment scripts)."""
  if not FLAGS.workdir:
    raise InputError("--workdir is required")
  if FLAGS.recipe == "encoder":
    res = train_encoder(encoder_config_from_flags(FLAGS), FLAGS.workdir, max_steps=FLAGS.max_steps)
  else:
    res = train(config_from_flags(FLAGS), FLAGS.workdir, max_steps=FLAGS.max_steps)
  if FLAGS.export and res.weights_path.exists():  # only a finished run writes its weights
    models.save_weights(res.pyramid, FLAGS.export)
    logging.info("exported weights to %s", FLAGS.export)
  return res
