"""batch-worker: drives Sentinel Hub Batch Processing API V2 jobs from RabbitMQ."""

__version__ = "0.1.0"

# The name the worker gives itself on the wire: AMQP app_id and connection names, the
# API's User-Agent, PostgreSQL's application_name.
APP_ID = "batch-worker"
