"""gradclip: drop-in, one-launch replacements for torch.nn.utils' gradient clipping.

    gradclip.clip_grad_norm_(model.parameters(), max_norm=1.0)     # same signature as torch
    gradclip.patch_torch()                                          # or route torch's own calls here

`import gradclip` needs no GPU, no Triton and no compiled extension; backends load lazily.
"""

from gradclip import backends, ops  # noqa: F401 (defines the gradclip::* torch.library ops)
from gradclip.backends import BackendUnavailableError
from gradclip.clip import clip_grad_norm_, clip_grad_value_, clip_grads_with_norm_, get_total_norm
from gradclip.clipper import Clipper, ClipStats
from gradclip.errors import (
    GradclipError,
    GradientDtypeError,
    GradientLayoutError,
    InvalidArgumentError,
    NonFiniteNormError,
    UnsupportedPlacementError,
)
from gradclip.patch import patch_torch, unpatch_torch
from gradclip.per_param import per_param_norms
from gradclip.thresholds import AGC, AutoClip, ZClip

__version__ = "0.1.0"

__all__ = [
    "AGC",
    "AutoClip",
    "BackendUnavailableError",
    "ClipStats",
    "Clipper",
    "GradclipError",
    "GradientDtypeError",
    "GradientLayoutError",
    "InvalidArgumentError",
    "NonFiniteNormError",
    "UnsupportedPlacementError",
    "clip_grad_norm_",
    "clip_grad_value_",
    "clip_grads_with_norm_",
    "get_total_norm",
    "patch_torch",
    "per_param_norms",
    "unpatch_torch",
    "ZClip",
]
