"""What a tracked request needs from its last known status (§3.2), and sending it (§3.3)."""

from __future__ import annotations

from worker.lifecycle.actions import Analyse, ReadTiles, Start, Stop
from worker.lifecycle.draft import Draft, SendKind, end, required
from worker.lifecycle.guards import analyse_first, start_held_for_cost, wanted_stop
from worker.lifecycle.state import StoppedReason


def drive(d: Draft) -> None:
    """Decide what the request needs from its last known status (§3.2)."""
    s, now, lag = d.state, d.now, d.policy.action_lag
    status = s.upstream_status
    reason = wanted_stop(s, now, d.policy)
    if status == "CREATED":
        if reason is not None:
            # The API cannot stop a CREATED request, and nothing will run unless the worker
            # asked; but an analyse/start sent less than action_lag ago may still take
            # effect behind a lagging status, so stop it too and wait that long.
            launched = max((t for t in (s.analyse_sent_at, s.start_sent_at) if t), default=None)
            if launched is None or now >= launched + lag:
                end(d, "STOPPED", stopped_reason=reason.value)
                d.set(stop_reason=reason)
                return
            stop(d, reason)
            d.wake_by(launched + lag)
        else:
            # start on CREATED runs analysis and then processing by itself (§3.2); a
            # start decided on the cost bound waits for the analysis.
            _send(d, "start" if s.start_wanted and not analyse_first(s) else "analyse")
    elif reason is not None:
        stop(d, reason)
    elif status == "ANALYSIS_DONE" and s.start_wanted and not start_held_for_cost(d):
        _send(d, "start")
    if d.status_read:
        _read_tiles(d)


def _read_tiles(d: Draft) -> None:
    s, rid = d.state, required(d.state.batch_request_id)
    if s.upstream_status == "PROCESSING":
        d.actions.append(ReadTiles(rid, execution_db=True))
    elif s.upstream_status == "ANALYSIS_DONE" and (s.tiles is None or s.tiles.total is None):
        d.actions.append(ReadTiles(rid, execution_db=False))
        if d.before.upstream_status != "ANALYSIS_DONE" and d.before.pause is None:
            # (Out of a pause the status is news at once: PAUSED must not outlive it.)
            # The engine reads the manifest straight away; hold the status event that
            # long so it carries the tile count a producer decides `start` on. Whatever
            # comes next (the tiles, a failure, a Wake) publishes it.
            d.hold_status = True
            d.wake_by(d.now + d.policy.tiles_wait)


def stop(d: Draft, reason: StoppedReason) -> None:
    if d.state.stop_reason is None:
        d.set(stop_reason=reason)
    _send(d, "stop")


def _send(d: Draft, kind: SendKind) -> None:
    """Ask for an action unless it was asked less than ``action_lag`` ago (§3.3).

    Either way, wake when the lag is over: should the status still not show the action's
    effect then (the poller saw no change to step on), the action is sent again.
    """
    s, rid = d.state, required(d.state.batch_request_id)
    sent = {"analyse": s.analyse_sent_at, "start": s.start_sent_at, "stop": s.stop_sent_at}[kind]
    if kind == "start" and sent is not None and s.analysis_done_at is not None:
        # A start sent before the analysis ended rolls into processing by itself (§3.2),
        # after the status lag: ANALYSIS_DONE shows for a while first. Count the lag from
        # when it showed, or nearly every auto-started job gets a refused second start.
        sent = max(sent, s.analysis_done_at)
    if sent is not None and d.now < sent + d.policy.action_lag:
        d.wake_by(sent + d.policy.action_lag)
        return
    held = s.resend_not_before
    if held is not None and d.now < held:
        d.wake_by(held)  # an action answered 404 in the window: its retry's turn comes then
        return
    if held is not None:
        d.set(resend_not_before=None)
    d.wake_by(d.now + d.policy.action_lag)
    if kind == "analyse":
        d.actions.append(Analyse(rid))
        d.set(analyse_sent_at=d.now)
    elif kind == "start":
        d.actions.append(Start(rid))
        d.set(start_sent_at=d.now)
    else:
        d.actions.append(Stop(rid))
        d.set(stop_sent_at=d.now)
