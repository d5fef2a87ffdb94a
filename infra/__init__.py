"""Local infrastructure for development, tests and the demo: a KRaft Kafka broker and MinIO.

Both are real servers fetched from their official distribution channels (Maven Central, the Go
module proxy), cached under ``~/.cache/sluice`` and started on free loopback ports.
"""
