"""One module per measurement: ``train``, ``generate``, ``memory``, ``floor``; each has ``run(...)``."""
