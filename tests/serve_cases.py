"""Whether this machine has a Triton server binary, for the tests that start a real one."""

import pytest

from dagc.errors import ServeError
from dagc.tools.serve import find_server


def server_missing() -> str | None:
    """Why no Triton server can start here (find_server's message), or None when one can."""
    try:
        find_server()
    except ServeError as e:
        return str(e)
    return None


needs_server = pytest.mark.skipif(server_missing() is not None, reason=f"no Triton server here: {server_missing()}")
