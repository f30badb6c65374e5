"""Plain-PyTorch ground truth for every kernel: slow and obviously correct."""
