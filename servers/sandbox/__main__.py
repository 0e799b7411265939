"""`python -m servers.sandbox [--transport stdio|http] [--host H] [--port N]`"""

from ..entry import serve_main
from .server import build_server

if __name__ == "__main__":
    serve_main("sandbox", 8001, build_server)
