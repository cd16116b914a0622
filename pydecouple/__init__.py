"""pydecouple: convolutions that skip the filters a sample does not need.

The kernels (``pydecouple.gated_conv2d``), the decoupling method of
*Interpretable Neural Network Decoupling* (ECCV 2020) around them, and its
three applications: interpretation (``pydecouple.paths``), acceleration
(``pydecouple.accelerate``) and adversarial detection (``pydecouple.adversarial``).
"""

from ._backend import explain as explain_backends, extension_available

extension_available()  # loads the compiled library once: registers its ops, or warns once why not

from . import ops  # noqa: E402
from .ops import gated_conv2d, masks_to_indices  # noqa: E402
from .nn import decouple  # noqa: E402
from .flops import flops  # noqa: E402  (the function; the module stays importable as pydecouple.flops)
from .accelerate import accelerate  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "ops", "gated_conv2d", "masks_to_indices", "decouple", "flops", "accelerate",
    "explain_backends", "extension_available", "__version__",
]
