"""``python -m nanoshard.cli``: the ``nanoshard`` command without its console script."""

import sys

from .commands import main

main(sys.argv[1:])
