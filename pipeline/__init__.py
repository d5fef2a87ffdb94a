"""The runtime every Sluice service shares: config, Kafka I/O, the stage loop, CLI."""

__version__ = "0.1.0"
