import sys

from .cli import lnmirror_main

sys.exit(lnmirror_main())
