"""lmstack.serve: the OpenAI-compatible HTTP server (FastAPI + uvicorn), its web chat page and `lmstack chat`.

Usage:
    from lmstack.infer import AsyncLLMEngine
    from lmstack.serve import ServerConfig, create_app
    app = create_app(AsyncLLMEngine("runs/model"), ServerConfig(model_name="tiny"))
    # or from the shell: lmstack serve --model runs/model --port 8000
"""
from lmstack.serve.app import create_app
from lmstack.serve.engine_bridge import ServerConfig

__all__ = ["ServerConfig", "create_app"]
