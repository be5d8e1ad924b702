"""Feedback -> what training can use of it: a reward function over hypotheses and a supervised target.

The edit-distance rewards themselves live in core/rewards.py (the server returns them from
SubmitCorrection); this module only maps each kind of feedback onto them:

| kind        | reward of a hypothesis h                                | supervised target | reference (gate) |
|-------------|---------------------------------------------------------|-------------------|------------------|
| correction  | -edit(h, corrected text) / len(corrected text)          | corrected text    | corrected text   |
| acceptance  | -edit(h, shown transcript) / len(shown transcript)      | shown transcript  | shown transcript |
| rejection   | -1 if h is the shown transcript, else 0                 | none (RL only)    | none             |
| choice      | -edit(h, chosen alternative) / len(chosen alternative)  | chosen alternative| chosen alt.      |

A choice is a preference: the candidates of its group include the alignment of every alternative
shown, so the chosen one (reward 0) is pushed up and the others (reward < 0) down, relative to the
group mean -- hypothesis selection as RL for ASR. A rejection only says "not this": its reward is
-1 for the shown text and 0 for anything else, which no supervised loss can express. The shown text
comes from the server's lexicon + LM beam search, so a sampled CTC path almost never spells it
exactly: its alignment joins the group too, or every candidate would score 0 and the rejection would
carry no signal at all.
Edits are counted in characters (`unit="char"`, spaces included) or words (`unit="word"`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from ..core.rewards import REJECTION_REWARD, char_edit_reward, word_edit_reward
from ..core.store import FeedbackKind, PendingFeedback
from ..core.text import normalize_text

RewardUnit = Literal["char", "word"]


def edit_reward(hypothesis: str, reference: str, unit: RewardUnit = "char") -> float:
    """-normalized edit distance of `hypothesis` to `reference`, in characters or words."""
    if unit == "char":
        return char_edit_reward(hypothesis, reference)
    if unit == "word":
        return word_edit_reward(hypothesis, reference)
    raise ValueError(f"unit must be 'char' or 'word' (got {unit!r})")


@dataclass(frozen=True)
class FeedbackItem:
    """One feedback item as training sees it."""

    feedback_id: int
    kind: FeedbackKind
    samples: np.ndarray
    """float32 16 kHz audio in [-1, 1), shape (n_samples,)."""
    shown: str
    """The transcript the user was shown (normalized)."""
    target: str | None
    """Supervised target (normalized), None for a rejection."""
    alternatives: tuple[str, ...] = ()
    """Texts whose CTC alignments join the candidate group (a choice's n-best, a rejection's shown
    transcript), normalized."""

    def reward(self, hypothesis: str, unit: RewardUnit = "char") -> float:
        if self.kind is FeedbackKind.REJECTION:
            return REJECTION_REWARD if hypothesis == self.shown else 0.0
        return edit_reward(hypothesis, self.target or "", unit)

    @property
    def reference(self) -> str | None:
        """What the gate scores held-out WER against (the target; None when there is none)."""
        return self.target


def feedback_item(pending: PendingFeedback) -> FeedbackItem:
    """Map a store row (feedback + its utterance with audio) onto a FeedbackItem.

    Raises ValueError for a choice whose index is outside the utterance's alternatives (the store
    refuses those at intake, so this means a corrupted row).
    """
    fb, utterance = pending.feedback, pending.utterance
    shown = normalize_text(utterance.hypothesis)
    alternatives: tuple[str, ...] = ()
    if fb.kind is FeedbackKind.CORRECTION:
        target = normalize_text(fb.corrected_text or "")
    elif fb.kind is FeedbackKind.ACCEPTANCE:
        target = shown
    elif fb.kind is FeedbackKind.REJECTION:
        target = None
        alternatives = (shown,) if shown else ()
    elif fb.kind is FeedbackKind.CHOICE:
        alternatives = tuple(normalize_text(a) for a in utterance.alternatives or ())
        if fb.chosen_index is None or not 0 <= fb.chosen_index < len(alternatives):
            raise ValueError(
                f"feedback {fb.id}: chosen_index {fb.chosen_index} is outside the {len(alternatives)} alternatives"
            )
        target = alternatives[fb.chosen_index]
    else:  # pragma: no cover - FeedbackKind is closed
        raise ValueError(f"feedback {fb.id}: unknown kind {fb.kind!r}")
    return FeedbackItem(fb.id, fb.kind, utterance.samples(), shown, target, alternatives)


__all__ = ["FeedbackItem", "RewardUnit", "edit_reward", "feedback_item"]
