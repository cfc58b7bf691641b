"""batch-worker: drives Sentinel Hub Batch Processing API V2 jobs from RabbitMQ."""

__version__ = "0.1.0"
