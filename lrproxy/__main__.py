import sys

from lrproxy.cli import main

sys.exit(main())
