"""The package's version: the one place it is written (pyproject.toml reads it from here), a
leaf module so that modules inside the package need not import the package's ``__init__``."""

__version__ = "0.2.0.dev0"
