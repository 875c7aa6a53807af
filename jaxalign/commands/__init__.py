"""One module per `jaxalign` subcommand (see jaxalign/cli.py)."""
