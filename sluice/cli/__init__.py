"""The ``sluice`` command line; ``main.app`` is the entry point."""
