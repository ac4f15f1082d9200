import sys

from lrq.cli import main

sys.exit(main())
