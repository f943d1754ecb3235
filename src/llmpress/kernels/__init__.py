"""Kernels behind one small interface (`ops`), each with a pure-PyTorch reference beside it."""
