"""Warning and error classes of pln-ref."""

from __future__ import annotations

__all__ = ["ConvergenceWarning", "OutlierCellsWarning", "TrainingDivergedError"]


class ConvergenceWarning(UserWarning):
    """A fit stopped at its step cap without meeting its stopping rule."""


class OutlierCellsWarning(UserWarning):
    """Some cells' per-cell evidence is far from the others' (robust z-score, see
    ``pln_ref.results.evidence_outliers``): a few extreme cells can move the fitted globals."""


class TrainingDivergedError(FloatingPointError):
    """An iterative fit became non-finite; the message says at which step and what to try."""
