"""pydecouple: convolutions that skip the filters a sample does not need.

The kernels (``pydecouple.ops.gated_conv2d``), the decoupling method of
*Interpretable Neural Network Decoupling* (ECCV 2020) around them, and its
three applications: interpretation, acceleration, adversarial detection.
"""

from . import ops
from .ops import gated_conv2d, masks_to_indices
from ._backend import explain as explain_backends, extension_available
from ._backend import _load_extension

_load_extension()  # registers the compiled ops, or warns once why not

__version__ = "0.1.0"

__all__ = ["ops", "gated_conv2d", "masks_to_indices", "explain_backends", "extension_available", "__version__"]
