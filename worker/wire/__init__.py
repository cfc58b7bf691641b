"""The wire contract's shapes, pure: job requests, events, the outbox's rows, the topology.

Nothing here does I/O; the store, the broker and the daemon above it put these shapes on
PostgreSQL and RabbitMQ.
"""
