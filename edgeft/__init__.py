"""edgeft: fine-tune small models, ship them to edge devices, keep them learning there."""

__version__ = "0.1.0"
