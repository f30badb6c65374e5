"""Triton kernels, their launch helpers and config heuristics. Installed as ``dpkern.kernels``."""
