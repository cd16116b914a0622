"""What the benchmark scripts share: the layer sets (the CPU and the CUDA
benchmark time the same VGG-16 and ResNet layers) and, from the library,
pydecouple.benchmarking's timing and table helpers (the demo uses them too).

Both bench_gated_conv.py and bench_gated_conv_cuda.py import from here, and
neither from the other.
"""

from pydecouple.benchmarking import (  # noqa: F401
    machine_description,
    machine_header,
    markdown_table,
    median_times,
    write_csv,
)

# (name, Cin, Cout, H, kernel): VGG-16's 3x3 layers on 32x32 CIFAR inputs (the
# first conv, 3 -> 64, is never gated), then ResNet-style ImageNet layers.
VGG16_CIFAR = [
    ("vgg16 64-64 32x32", 64, 64, 32, 3),
    ("vgg16 64-128 16x16", 64, 128, 16, 3),
    ("vgg16 128-128 16x16", 128, 128, 16, 3),
    ("vgg16 128-256 8x8", 128, 256, 8, 3),
    ("vgg16 256-256 8x8", 256, 256, 8, 3),
    ("vgg16 256-512 4x4", 256, 512, 4, 3),
    ("vgg16 512-512 4x4", 512, 512, 4, 3),
    ("vgg16 512-512 2x2", 512, 512, 2, 3),
]
RESNET_IMAGENET = [
    ("resnet 64 56x56 3x3", 64, 64, 56, 3),
    ("resnet 128 28x28 3x3", 128, 128, 28, 3),
    ("resnet 256 14x14 3x3", 256, 256, 14, 3),
    ("resnet 512 7x7 3x3", 512, 512, 7, 3),
    ("resnet 64 56x56 1x1", 64, 64, 56, 1),
    ("resnet 128 28x28 1x1", 128, 128, 28, 1),
    ("resnet 256 14x14 1x1", 256, 256, 14, 1),
    ("resnet 512 7x7 1x1", 512, 512, 7, 1),
]
# Shapes of neither set, for checking that the dispatcher's thresholds (fitted
# on the two sets above) carry over: other widths, sizes and a strided conv.
HELDOUT = [
    ("held 96-96 24x24", 96, 96, 24, 3),
    ("held 48-96 40x40", 48, 96, 40, 3),
    ("held 192-192 12x12", 192, 192, 12, 3),
    ("held 160-320 10x10", 160, 320, 10, 3),
    ("held 384-384 6x6", 384, 384, 6, 3),
    ("held 320-320 3x3", 320, 320, 3, 3),
    ("held 192-384 14x14 1x1", 192, 384, 14, 1),
    ("held 768-768 5x5 1x1", 768, 768, 5, 1),
]
