"""V's lease on a migration: a source that falls silent before the point of no return loses it.

P's agent speaks to V all through a migration: page batches, round marks, the cutover's calls. One
that stops for `limits.source_silence_s` (P crashed, its agent died and nobody rolled back, the
network to V is gone) would otherwise hold V's waiting VM, a VM of P's memory size, and the page
store's descriptors for ever. Giving up is safe only before the point of no return: then P runs on,
or is gone. V fails the migration, destroys its waiting VM, and keeps the copy on disk until P's
rollback or the operator's cancel frees it. The verdict is a pure function; the watch loop lives
in dest_agent.service.
"""

from __future__ import annotations


def abandon_reason(silent_s: float, lease_s: float, *, finished: bool, past_point_of_no_return: bool,
                   receiving: bool) -> str:
    """Why V gives this migration up now (empty: it keeps it). Pure.

    Never once P committed (the VM is P, whatever it says), never while P's helper streams the image
    (its own timeouts end that), never for a finished migration (an undecided image is journaled
    failed and waits for P's word)."""
    if lease_s <= 0 or finished or past_point_of_no_return or receiving or silent_s < lease_s:
        return ""
    return (f"the source said nothing for {silent_s:.0f} s (limits.source_silence_s = {lease_s:g}): "
            "V gave the migration up and destroyed its waiting VM; P runs on, and its rollback "
            "(or a cancel) frees V's copy")


def watch_period_s(lease_s: float) -> float:
    """How often V looks (a quarter of the lease, between 0.5 and 30 s): a silent source loses
    its migration at most a quarter-lease late."""
    return min(30.0, max(0.5, lease_s / 4))
