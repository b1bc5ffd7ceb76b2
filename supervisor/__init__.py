"""A process supervisor for virtualization hosts, on Trio.

The engine's public API, for service types under ``services/``: specs
(`ServiceSpec` and friends), the TOML `Table` reader with its errors, and the
`ServiceType` registration record, and `replace_file` / `chown_file` for the
files a service type writes or hands to a service user (never through a
symlink another user could have planted).  Custom actions raise `ProtocolError`
(e.g. ``ProtocolError("bad-arguments", "...")``) for errors the client caused.  The engine itself knows nothing of any
particular daemon.
"""

from __future__ import annotations

__version__ = "0.1.0"

from . import _lazy

_lazy.defer(*_lazy.UNUSED)  # before trio, structlog and psutil are imported (see _lazy)

from herd.protocol import ProtocolError as ProtocolError

from ._fs import chown_file as chown_file
from ._fs import replace_file as replace_file
from ._output import note as note
from ._threads import run_sync as run_in_thread
from .config import BuildContext as BuildContext
from .config import ServiceType as ServiceType
from .config import parse_signal as parse_signal
from .config import read_service_table as read_service_table
from .schema import ConfigError as ConfigError
from .schema import ConfigErrors as ConfigErrors
from .schema import Table as Table
from .spec import ActionContext as ActionContext
from .spec import ActionSpec as ActionSpec
from .spec import Creates as Creates
from .spec import ReadySpec as ReadySpec
from .spec import RespawnLimit as RespawnLimit
from .spec import ServiceSpec as ServiceSpec
from .spec import SocketSpec as SocketSpec
from .spec import TypeState as TypeState

__all__ = [
    "__version__",
    "ActionContext",
    "ActionSpec",
    "BuildContext",
    "ConfigError",
    "ConfigErrors",
    "Creates",
    "ProtocolError",
    "ReadySpec",
    "RespawnLimit",
    "ServiceSpec",
    "ServiceType",
    "SocketSpec",
    "Table",
    "TypeState",
    "chown_file",
    "note",
    "parse_signal",
    "read_service_table",
    "replace_file",
    "run_in_thread",
]
