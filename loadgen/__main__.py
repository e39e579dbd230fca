"""``python -m genserve.loadgen``: the same as ``genserve loadgen``."""
from genserve.loadgen.cli import main

main()
