"""Worked example: bring your own generator to surfing (scikit-learn's 8x8 digits)."""

ARCH_NAME = "digits-mlp"  # the entry point this package declares in surfing.architectures
