import sys

from memdec_fast.cli.commands import main

sys.exit(main())
