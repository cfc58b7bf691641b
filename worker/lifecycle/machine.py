"""The step: one observation in, the new state, the actions and at most one event out.

The rules, and why, are in ``docs/lifecycle.md``; the sections of batch-v2-api.md cited
here are where the API behaviour they rely on is documented.

``step`` is the one transition function; its phases live beside it and hand one
``Draft`` (``draft.py``) to each other and to the guards every phase applies
(``guards.py``: deadline, cost, cancel). From the bottom up: ``draft`` (the step in the
making, ending and duplicate stops), ``guards``, ``drive`` (the actions a status asks for),
``reads`` (a 404, tile counts), ``creating`` (the create attempts), ``paused`` (a stop
the job resumes from), ``ending`` (final tiles, a follow-up's input), ``tracking`` (a
known request's observations, a task read folded in), ``pending`` (before the request is
known) and ``finish`` (the event and the next wake). A module imports only those below it.
"""

from __future__ import annotations

from datetime import datetime

from worker.lifecycle.actions import Policy, Transition
from worker.lifecycle.draft import Draft, duplicate
from worker.lifecycle.finish import finish
from worker.lifecycle.observations import CreateSucceeded, DuplicateFound, Observation
from worker.lifecycle.pending import pending
from worker.lifecycle.state import JobState, Phase
from worker.lifecycle.tracking import tracking

DEFAULT_POLICY = Policy()


def step(
    state: JobState, observation: Observation, now: datetime, policy: Policy = DEFAULT_POLICY
) -> Transition:
    """Fold one observation into the job's state; say what to do next and what to publish."""
    draft = Draft(before=state, state=state, now=now, policy=policy)
    if state.phase is Phase.ENDED:
        _after_end(draft, observation)
    elif state.phase is Phase.PENDING_CREATE:
        pending(draft, observation)
    else:
        tracking(draft, observation)
    return finish(draft)


def fold_requests(state: JobState, *, cancel: bool, start: bool) -> JobState:
    """The state with a ``cancel`` / ``start`` that arrived while a step was being decided.

    The engine steps the same observation again on it (the first decision is discarded
    unsaved, its actions never run): the request is known *before* that observation, as if
    it had come just ahead of it, without a step of its own in between (which, before a
    request is known, would end the job and make the request the create just returned look
    like a duplicate). An ended job is left as it is.
    """
    if state.phase is Phase.ENDED:
        return state
    changes: dict[str, object] = {}
    if cancel and not state.cancel_wanted:
        changes["cancel_wanted"] = True
    if start and not state.start_wanted:
        changes["start_wanted"] = True
    if start and state.pause is not None and not state.pause.resume_requested:
        changes["pause"] = state.pause.model_copy(update={"resume_requested": True})
    return state.model_copy(update=changes) if changes else state


def _after_end(d: Draft, obs: Observation) -> None:
    # A request that turns up after the end (a create found by a late scan, say after a
    # cancel while a create was uncertain) must still be stopped; nothing else matters.
    if isinstance(obs, DuplicateFound):
        duplicate(d, obs.batch_request_id)
    elif isinstance(obs, CreateSucceeded):
        duplicate(d, obs.task.id)
