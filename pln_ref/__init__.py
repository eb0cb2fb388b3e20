"""pln-ref: reference implementation of the Poisson log-normal model with capture."""

from .params import Capture, PLNParams

__all__ = ["Capture", "PLNParams"]
__version__ = "0.1.0"
