"""``python -m lightning_queue``: the ``lightning-queue`` command."""

from lightning_queue.ops.cli import main

main()
