"""datumflow: datum-parallel data pipelines on NATS JetStream."""

__version__ = "0.1.0"
