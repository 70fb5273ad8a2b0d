"""swift_lycoris: LyCORIS adapters computed by the Swift lycoris-server.

- :func:`create_lycoris` / :func:`create_lycoris_from_weights`: adapters on any torch model.
- :mod:`swift_lycoris.kohya`: a drop-in ``--network_module`` for kohya sd-scripts.
"""

from .network import AdapterFunction, DeltaWeightFunction, LycorisNetwork
from .nonfinite import NonFiniteError
from .server import AdapterFileError, Server, ServerDied, ServerError, ServerNotFound, describe_file, find_server
from .wrapper import create_lycoris, create_lycoris_from_weights

__all__ = [
    "AdapterFileError", "AdapterFunction", "DeltaWeightFunction", "LycorisNetwork", "NonFiniteError", "Server",
    "ServerDied", "ServerError",
    "ServerNotFound", "describe_file", "find_server",
    "create_lycoris", "create_lycoris_from_weights",
]
