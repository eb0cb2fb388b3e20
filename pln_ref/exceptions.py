"""Warning classes of pln-ref."""

from __future__ import annotations

__all__ = ["ConvergenceWarning"]


class ConvergenceWarning(UserWarning):
    """A fit stopped at its step cap without meeting its stopping rule."""
