"""Numerical constants shared across pln-ref (one definition each)."""

from __future__ import annotations

import math

__all__ = ["LOG_2PI"]

#: log(2 pi), the Gaussian normaliser's constant.
LOG_2PI = math.log(2.0 * math.pi)
