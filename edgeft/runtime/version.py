"""edgeft's version, where both sides read it: the device writes it into heads it trains."""

__version__ = "0.1.0"
