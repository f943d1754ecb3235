"""Weight-only post-training quantization: algorithms (RTN, GPTQ, AWQ), the packed format, QuantLinear."""
