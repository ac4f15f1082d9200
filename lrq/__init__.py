"""lrq: batch workers over a local, file-based left/right queue.

Importing lrq does nothing but define names; build an :class:`lrq.app.App` from a config.
"""
__version__ = "0.1.0"
