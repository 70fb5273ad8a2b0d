"""swift_lycoris: LyCORIS adapters computed by the Swift lycoris-server.

- :func:`create_lycoris` / :func:`create_lycoris_from_weights`: adapters on any torch model.
- :mod:`swift_lycoris.kohya`: a drop-in ``--network_module`` for kohya sd-scripts.
"""

from .network import AdapterFunction, DeltaWeightFunction, LycorisNetwork
from .server import Server, ServerDied, ServerError, ServerNotFound, find_server
from .wrapper import create_lycoris, create_lycoris_from_weights

__all__ = [
    "AdapterFunction", "DeltaWeightFunction", "LycorisNetwork", "Server", "ServerDied", "ServerError", "ServerNotFound", "find_server",
    "create_lycoris", "create_lycoris_from_weights",
]
