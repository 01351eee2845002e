"""`diffsr serve`: an HTTP API with a job queue, and a web page, over the method registry.

Needs the `server` extra (`pip install 'diffsr[server]'`: FastAPI, uvicorn, python-multipart).
"""

from diffsr.server.app import ServerConfig, create_app

__all__ = ["ServerConfig", "create_app"]
