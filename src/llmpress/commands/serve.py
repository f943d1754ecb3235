"""`llmpress serve`: an OpenAI-compatible HTTP server (completions, chat completions) over the engine."""

from __future__ import annotations

import argparse

from llmpress.commands import common
from llmpress.commands.engine_args import add_engine_args, add_engine_draft_args, engine_config_from_args
from llmpress.commands.generate import add_kernel_args, apply_kernel_args
from llmpress.errors import LlmpressError


def register(subparsers) -> None:
    parser = subparsers.add_parser("serve", help="serve the model over an OpenAI-compatible HTTP API",
                                   description="Serve one model at /v1/completions, /v1/chat/completions and "
                                               "/v1/models (OpenAI's API), with continuous batching over a paged "
                                               "KV cache.")
    common.add_model_args(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")
    parser.add_argument("--served-model-name", default=None, metavar="NAME",
                        help="model id clients ask for (default: the --model value)")
    add_engine_args(parser)
    add_engine_draft_args(parser)
    add_kernel_args(parser)
    parser.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"),
                        help="uvicorn's log level (default: info)")
    parser.set_defaults(func=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    # Check the extra before a model load of minutes.
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError as error:
        raise LlmpressError(f"llmpress serve needs fastapi and uvicorn ({error.name} is missing); "
                            "install them with: pip install 'llmpress[serve]'.") from None
    from llmpress.engine import LLMEngine
    from llmpress.server import AsyncEngine
    from llmpress.server.app import build_app

    apply_kernel_args(args)
    config = engine_config_from_args(args)
    engine = LLMEngine.from_model_spec(args.model, config, dtype=args.dtype, device=args.device)
    app = build_app(AsyncEngine(engine), args.served_model_name or args.model)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0
