"""Local multi-process simulation and the ``finlora`` command line."""
