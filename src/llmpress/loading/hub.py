"""Download a checkpoint from the Hugging Face hub (for users with a network)."""

from __future__ import annotations

from pathlib import Path

from llmpress.errors import ModelLoadError

# Only what llmpress reads: weights, configs, tokenizer and chat template.
ALLOW_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja", "*.txt"]


def download_from_hub(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ModelLoadError("loading from the hub needs huggingface_hub: pip install huggingface_hub") from None
    try:
        return Path(snapshot_download(repo_id, allow_patterns=ALLOW_PATTERNS))
    except Exception as error:  # offline, gated, or unknown repo: all end the same way for the user
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelLoadError(
            f"could not download {repo_id!r} from the Hugging Face hub ({type(error).__name__}: {reason[:200]}); "
            "if this machine is offline or the repo is gated, download it elsewhere and pass the local directory with --model PATH."
        ) from None
