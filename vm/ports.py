"""Free TCP ports on 127.0.0.1 for QEMU's SSH forwarding."""
import socket

from .errors import SetupError


def free_port() -> int:
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]
    except OSError as e:
        raise SetupError(f"no free TCP port on 127.0.0.1 for the guest's SSH forward: {e}") from e
