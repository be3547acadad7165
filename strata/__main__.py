"""``python -m strata`` runs the ``strata`` command."""

from strata.cli import main

main()
