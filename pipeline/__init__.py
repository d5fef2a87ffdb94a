"""The library every Sluice service imports: config, errors, the stage runtime, the client,
observability, storage, Kafka admin and the scaling policy. Imports ``schemas`` only."""

__version__ = "0.1.0"
