"""The version, in a module of its own so that any module may import it
without importing the package's public facade (``mps/__init__``)."""
__version__ = "0.1.0"
