"""``loraq serve``: a live web dashboard over the home, through the same api as the CLI.

Torch-free. Starlette and uvicorn come with the ``serve`` extra
(``pip install 'loraq[serve]'``); templates and static files ship inside this package,
and nothing is fetched at run time.
"""

from .app import Settings, create_app
from .security import check_host, is_loopback
from .server import Listening, serve

__all__ = ["Listening", "Settings", "check_host", "create_app", "is_loopback", "serve"]
