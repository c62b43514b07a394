"""``python -m askd.data.synthetic``: runs the command of askd.data.synthetic.cli."""

from .cli import main

main()
