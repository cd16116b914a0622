"""Accelerated inference: a decoupled model that runs only its paths.

``accelerate(model)`` turns a (trained) decoupled model into an inference-only
module computing the same function as the model's eval forward (masked dense
computation), but where every gated conv runs the gated kernel, so a sample
skips the filters its gate deselects and the input channels that arrive as
zeros:

* BatchNorm is folded into the conv whose output it normalises (eval
  statistics): ``W' = W * s``, ``b' = (b - mean) * s + beta`` with
  ``s = gamma / sqrt(var + eps)``, computed in float64 and rounded once
  (:mod:`.fold`, also used for a gate's logit BatchNorm).
* Each gated conv computes its mask from its own input with its ACM, exactly as
  :class:`~pydecouple.nn.ArchitectureControl` does in eval (``logits > 0``).
* The conv runs with its own out-mask and, where the decoupled model chains one
  (``conv.in_mask_source``), the upstream layer's mask as in-mask.
* Bias, ReLU and mask are one fused epilogue (``relu=True``) where the block
  allows: VGG conv-BN-ReLU, the first (and for bottlenecks the second) conv of
  a residual block. The last conv of a residual block is folded conv + BN +
  mask without ReLU (the mask comes before the residual add); then the add and
  the ReLU. Shortcut channels are dense unless the shortcut is gated.
* Ungated convs are plain folded convs; pooling, the head and anything not
  recognised are kept as they are (:mod:`.convert`, which also says, in
  ``accel.accelerate_summary``, which modules keep a forward of their own).

Every conv runs through the one dispatcher, :func:`pydecouple._backend.run`
(:mod:`.modules`): on float32 CPU tensors the compiled kernel, except where
gating cannot pay (nearly every channel kept), where dense ``F.conv2d`` + ReLU
+ mask runs, so a model whose gates are all on is not slower than its dense
twin. The kept fractions that rule needs are counted once per mask on the
host, on CPU tensors only and never while a graph is captured
(``torch.compile``, ``torch.export``, ``torch.jit.trace``: the kernel always
runs there, with every mask applied).

``tune(accel_model, x)`` measures each gated layer's dense-or-kernel
crossover on this machine (cached per machine) and sets it on the layer
(:mod:`.tuning`); without it a rule fitted on one CPU decides.

``profile(accel_model, x)`` times every layer's gate, conv and the rest
(:mod:`.profiling`).
"""

from .convert import AccelerateSummary, accelerate
from .fold import fold_bn, fold_bn_into
from .modules import AccelConv, AccelGate, AccelResidual, AccelSequential, accel_layers, probing
from .profiling import LayerProfile, ModelProfile, profile
from .tuning import TuneReport, tune

__all__ = [
    "accelerate", "AccelerateSummary", "AccelConv", "AccelGate", "AccelSequential", "AccelResidual",
    "fold_bn", "fold_bn_into", "profile", "LayerProfile", "ModelProfile", "accel_layers", "probing",
    "tune", "TuneReport",
]
