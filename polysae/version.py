"""The package version, in a module of its own so that any module can read it without importing
the package face (``polysae/__init__.py``) and the model core it pulls in."""

__version__ = "0.3.0"
