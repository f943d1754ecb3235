"""Measurement helpers: memory bandwidth and the decode roofline it implies."""
