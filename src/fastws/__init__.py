"""fastws: a WebSocket chat and pub/sub server with a compiled broadcast fan-out."""

from .auth import Principal, Verifier, mint
from .config import Settings, load_settings
from .errors import AuthError, CloseCode, ConfigError, FastWSError, MessageError
from .publisher import Publisher, PublishError
from .server import Node, serve

__version__ = "0.1.0"

__all__ = [
    "AuthError",
    "CloseCode",
    "ConfigError",
    "FastWSError",
    "MessageError",
    "Node",
    "Principal",
    "PublishError",
    "Publisher",
    "Settings",
    "Verifier",
    "__version__",
    "load_settings",
    "mint",
    "serve",
]
