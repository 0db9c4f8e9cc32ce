"""gradclip's exception classes: each is also the exception type torch raises for the same input.

Code written for torch.nn.utils catches torch's exception types around clipping (`except
RuntimeError`), so under `gradclip.patch_torch()` each gradclip error derives from the type torch
raises on the same bad input (found by running torch 2.13 on it), as well as from the type
gradclip raised before (so `except TypeError` / `except ValueError` keep working), and from
`GradclipError`, which catches them all.

| input | torch 2.13 raises | gradclip raises |
|---|---|---|
| integer or bool gradients | RuntimeError | GradientDtypeError (TypeError, RuntimeError) |
| sparse gradients | NotImplementedError | GradientLayoutError (ValueError, NotImplementedError) |
| error_if_nonfinite=True, non-finite norm | RuntimeError | NonFiniteNormError (RuntimeError) |
| NaN or negative max_norm / clip_value, NaN norm_type | nothing: NaN or unclipped gradients | InvalidArgumentError (ValueError) |
| a DTensor placement torch cannot gather | (varies) | UnsupportedPlacementError (NotImplementedError) |
"""

from __future__ import annotations


class GradclipError(Exception):
    """Base class of every error gradclip raises on bad input."""


class GradientDtypeError(GradclipError, TypeError, RuntimeError):
    """A gradient that is not floating point or complex (torch raises RuntimeError)."""


class GradientLayoutError(GradclipError, ValueError, NotImplementedError):
    """A gradient that is not dense, e.g. sparse (torch raises NotImplementedError)."""


class InvalidArgumentError(GradclipError, ValueError):
    """An argument out of its domain: NaN or negative max_norm / clip_value, NaN norm_type, ..."""


class NonFiniteNormError(GradclipError, RuntimeError):
    """error_if_nonfinite=True and the norm is NaN or infinite (torch raises RuntimeError)."""


class UnsupportedPlacementError(GradclipError, NotImplementedError):
    """A DTensor gradient whose placement gradclip does not know and torch cannot gather."""
