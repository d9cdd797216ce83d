"""``python -m kiapi_core.cli``: the ``kiapi`` command."""

from kiapi_core.cli import main

main()
