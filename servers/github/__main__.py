"""`python -m servers.github [--transport stdio|http] [--host H] [--port N]`"""

from ..entry import serve_main
from .config import Settings
from .server import build_server

if __name__ == "__main__":
    settings = Settings.from_env()
    serve_main("github", 8003, lambda: build_server(settings), settings.secrets())
