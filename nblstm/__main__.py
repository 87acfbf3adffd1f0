"""``python -m nblstm``: see :mod:`nblstm.cli`."""
import sys

from .cli import main

sys.exit(main())
