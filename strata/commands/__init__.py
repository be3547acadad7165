"""Command groups of ``strata``: each module defines ``register(app)``.

:mod:`strata.cli` imports every module here at start, so a command group is
added by adding a module, without touching the core command file.
"""
