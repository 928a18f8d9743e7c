"""``python -m agent`` is the ``shipmate`` command."""

from agent.cli import main

main(prog_name="shipmate")
