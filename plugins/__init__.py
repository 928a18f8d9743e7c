"""Shipmate's built-in plugins, grouped by kind. Each module is an ordinary plugin,
loaded through the ``shipmate`` entry-point group like a third-party one; they
import only the public API of :mod:`agent`."""
