"""The worker process and its loops: the supervisor, the jobs consumer and intake, the
engine with its poller and action runner, tile reads, the outbox relay, liveness and the
health endpoints."""
