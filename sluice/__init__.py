"""The ``sluice`` command and the operator tools: CLI, supervisor, lag, dashboard, demo."""
