"""fedlora's version (a leaf module: the run records stamp it without importing the package facade)."""

__version__ = "0.1.0"
