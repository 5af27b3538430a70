"""edgeft: fine-tune small models, ship them to edge devices, keep them learning there."""

from .hookspecs import hookimpl

__version__ = "0.1.0"
__all__ = ["hookimpl", "__version__"]
