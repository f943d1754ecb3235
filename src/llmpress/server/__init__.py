"""OpenAI-compatible serving: an asyncio front (AsyncEngine) over the engine, and the HTTP app (server.app).

`llmpress.server.app` needs the `serve` extra (fastapi, uvicorn); AsyncEngine does not.
"""

from llmpress.server.async_engine import AsyncEngine, EngineDeadError

__all__ = ["AsyncEngine", "EngineDeadError"]
