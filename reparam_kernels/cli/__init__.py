"""Subcommands of ``python -m reparam_kernels``: one module per command, each with ``main(argv)``."""
