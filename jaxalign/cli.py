"""The `jaxalign` command line: `jaxalign <command> [--flags]`.

Each command lives in `jaxalign/commands/<name>.py` and defines its absl flags at import and a
`main(argv)`. Only the chosen command's module is imported, so commands never fight over flag names.
Bad input (an `InputError`, a missing path) exits with status 2 and one line naming the problem.
Commands that read volumes also get `--resolution=z,y,x`: nm per pixel of input volumes whose
metadata records none (plain zarr / N5 arrays of other tools); see `jaxalign.volume.store.open_volume`.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import sys

from absl import app, flags

from jaxalign.errors import InputError

# command name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
  "demo": ("jaxalign.commands.demo", "make a realistic EM stack, distort it, align it, write a report"),
  "import": ("jaxalign.commands.import_stack", "import a PNG/TIFF stack into a volume"),
  "export": ("jaxalign.commands.export", "export a volume to PNG/TIFF sections"),
  "pyramid": ("jaxalign.commands.pyramid", "build MIP levels of a volume"),
  "align": ("jaxalign.commands.align", "align a volume (blocks, voting, composition with decay)"),
  "render": ("jaxalign.commands.render", "warp a volume by a field volume"),
  "eval": ("jaxalign.commands.eval", "evaluate alignment (CPC; tissue deformation of fields; EPE with ground truth)"),
  "train": ("jaxalign.commands.train", "train a SEAMLeSS pyramid"),
  "view": ("jaxalign.commands.view", "write neuroglancer layers; --serve opens an offline viewer"),
  "detect": ("jaxalign.commands.detect", "detect cracks, folds and tissue"),
  "train-detector": ("jaxalign.commands.train_detector", "train the defect/tissue detector"),
}


def _usage() -> str:
  lines = ["usage: jaxalign <command> [--flags]   (jaxalign <command> --helpfull for flags)", "", "commands:"]
  for name, (mod, doc) in COMMANDS.items():
    if importlib.util.find_spec(mod) is not None:
      lines.append(f"  {name:16s}{doc}")
  return "\n".join(lines)


# Commands that open existing volumes; unless the command defines its own --resolution (import: the
# stack's), they get one for inputs whose metadata records no resolution.
VOLUME_COMMANDS = ("export", "pyramid", "align", "render", "eval", "view", "detect")


def define_resolution_flag(command: str) -> bool:
  """Defines --resolution for a volume-reading `command` that has none; returns whether it did."""
  if command not in VOLUME_COMMANDS or "resolution" in flags.FLAGS:
    return False
  flags.DEFINE_string("resolution", None, "nm per pixel as z,y,x (e.g. 40,4,4) of input volumes whose metadata "
                      "records none (plain zarr / N5 arrays); recorded resolutions are kept")
  return True


# Help is answered before absl parses the command line: absl only defines its own --help flags when
# `app.run` starts, so parsing first would reject them as unknown flags.
HELP_FLAGS = ("--help", "-h", "--helpshort", "-?")
HELPFULL_FLAGS = ("--helpfull",)


def command_help(command: str, module, *, full: bool = False) -> str:
  """`jaxalign <command> --help` text: the command's docstring and its flags with their defaults
  (those defined by jaxalign modules; `full` adds every flag, absl's and JAX's included)."""
  doc = (module.__doc__ or COMMANDS[command][1]).strip()
  if full:
    body = flags.FLAGS.get_help()
  else:
    by_module = flags.FLAGS.flags_by_module_dict()
    body = "\n".join(flags.FLAGS.module_help(name) for name in sorted(by_module) if name.startswith("jaxalign."))
  return f"{doc}\n\nflags (jaxalign {command} --helpfull for all):\n{body}"


def fail(command: str, message: str) -> "NoReturn":  # noqa: F821
  """Prints one line naming the problem and exits with status 2."""
  sys.stderr.write(f"jaxalign {command}: error: {message}\n")
  sys.exit(2)


def run(argv: list[str] | None = None) -> None:
  """Console-script entry point."""
  argv = list(sys.argv if argv is None else argv)
  if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
    sys.stdout.write(_usage() + "\n")
    sys.exit(0 if len(argv) >= 2 else 2)
  command = argv[1]
  if command not in COMMANDS:
    fail(command, f"unknown command {command!r} (jaxalign --help lists the commands)")
  # JAX probes for TPU/GPU plugins and logs each miss at INFO; that is noise on a user's terminal.
  logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
  # Compiled programs are kept on disk: the second run of the same shapes skips 10-30 s of compiling.
  from jaxalign import compile_cache
  compile_cache.quick_cpu_compile()
  compile_cache.enable()
  module = importlib.import_module(COMMANDS[command][0])
  shared_resolution = define_resolution_flag(command)
  cmd_argv = [f"jaxalign {command}"] + argv[2:]
  if any(a in HELP_FLAGS + HELPFULL_FLAGS for a in argv[2:]):
    sys.stdout.write(command_help(command, module, full=any(a in HELPFULL_FLAGS for a in argv[2:])) + "\n")
    sys.exit(0)
  # Parse once ourselves so a bad or missing flag is one line and exit status 2, not absl's FATAL.
  try:
    flags.FLAGS(cmd_argv)
  except flags.Error as e:
    fail(command, str(e))
  if shared_resolution and flags.FLAGS.resolution is not None:
    from jaxalign.volume import store
    try:
      res = store.parse_resolution(flags.FLAGS.resolution)
    except InputError as e:
      fail(command, str(e))
    # store.open_volume reads it here and in the workers this run starts (they inherit the environment)
    os.environ[store.RESOLUTION_ENV] = ",".join(str(r) for r in res)

  def main(args):
    try:
      return module.main(args)
    except InputError as e:
      fail(command, str(e))
    except FileNotFoundError as e:
      fail(command, f"missing path: {e.filename or e}")

  try:
    app.run(main, argv=cmd_argv)
  except app.UsageError as e:  # pragma: no cover - absl handles most itself
    fail(command, str(e))


if __name__ == "__main__":
  run()
