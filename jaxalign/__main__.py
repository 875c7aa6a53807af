from jaxalign.cli import run

run()
