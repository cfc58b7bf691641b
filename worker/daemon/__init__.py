"""The worker process and its loops: the supervisor, the jobs consumer and intake, the
engine with its action runner, the status loop with its poller, tile reads, the outbox
relay, liveness and the health endpoints."""
