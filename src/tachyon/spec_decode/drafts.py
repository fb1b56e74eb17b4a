"""Drafts a draft model proposed on the worker, kept by the scheduler for the request's next
step (``method: draft_model``).

The drafter runs after each step's verify, so its drafts arrive with the step's output; the
scheduler hands them back to the runner in the next step, where the target verifies them.
A draft list is only valid for the token count it was proposed at: a request whose tokens
changed otherwise (stopped, preempted and recomputed) simply decodes without it.
"""

from __future__ import annotations


class DraftStore:
    """Per request: (its token count when proposed, the drafts). The scheduler's proposer
    for a draft model (the same ``propose`` / ``drop`` as ``NgramProposer``)."""

    def __init__(self, num_speculative_tokens: int) -> None:
        self.k = num_speculative_tokens
        self._drafts: dict[str, tuple[int, list[int]]] = {}

    def store(self, request_id: str, num_tokens: int, drafts: list[int]) -> None:
        self._drafts[request_id] = (num_tokens, drafts)

    def propose(self, request_id: str, token_ids: list[int], max_drafts: int) -> list[int]:
        """The drafts proposed after the request's last step, at most ``max_drafts``; none
        if they were proposed for another token count. Each list is handed out once."""
        entry = self._drafts.pop(request_id, None)
        if entry is None or entry[0] != len(token_ids):
            return []
        return entry[1][:min(self.k, max_drafts)]

    def drop(self, request_id: str) -> None:
        self._drafts.pop(request_id, None)
