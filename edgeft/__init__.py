"""edgeft: fine-tune small models, ship them to edge devices, keep them learning there."""

from .hookspecs import hookimpl
from .runtime.version import __version__

__all__ = ["hookimpl", "__version__"]
