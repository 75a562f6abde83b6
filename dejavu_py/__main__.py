import sys

from dejavu_py.cli import main

sys.exit(main())
