"""lopt's version, in one place (checkpoint manifests record it)."""
__version__ = "0.2.0"
