"""fp8vl's version, in a module of its own: cards, error files and resume keys name it, and the
package's ``__init__`` (which imports the converter lazily) re-exports it, so nothing imports the
package root for it. pyproject.toml reads it from here."""

__version__ = "0.1.0"
