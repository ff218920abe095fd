"""The package version (a leaf module: importing it never imports the rest of deltakit)."""

__version__ = "0.1.0"
