"""llmpress: make a Llama-family model faster and smaller on one GPU, and prove it with numbers."""

__version__ = "0.1.0"
