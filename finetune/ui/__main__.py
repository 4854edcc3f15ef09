"""python -m finetune.ui: serve the web UI (see finetune/ui/__init__.py)."""

from . import main

main()
