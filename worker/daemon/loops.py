"""The daemon's loops by name: what ``/healthz``, the liveness gauges and the logs call them.

One place, so the loop that beats and the watch that bounds it cannot spell a name two ways.
"""

from __future__ import annotations

CONSUMER = "consumer"  # the jobs consumer and intake (worker/daemon/consumer.py)
ENGINE = "engine"  # the claim loop (worker/daemon/engine.py)
POLLER = "poller"  # the status loop (worker/daemon/status_loop.py)
RELAY = "relay"  # the outbox relay (worker/daemon/relay.py)
# The relay's progress through the outbox, not its turns: rows published or parked, or
# nothing to publish. A relay going round with rows it never moves is stalled on this.
RELAY_OUTBOX = "relay-outbox"
SUPERVISOR = "supervisor"  # the supervisor's own tick (worker/daemon/supervisor.py)
# Job steps, on whichever thread runs them (the engine-N pool, the status loop's
# poll-step-N): watched per busy thread, not per turn (``Health.register(per_thread=True)``).
STEPS = "engine-steps"
