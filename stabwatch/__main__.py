import sys

from stabwatch.cli import main

sys.exit(main())
