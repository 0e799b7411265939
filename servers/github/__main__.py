"""`python -m servers.github [--transport stdio|http] [--host H] [--port N]`"""

from common.settings import ConfigError

from ..entry import refuse_config, serve_main
from .config import Settings
from .server import build_server

if __name__ == "__main__":
    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        refuse_config("github", exc)
    serve_main("github", 8003, lambda: build_server(settings), settings.secrets())
