import sys

from wanpipe.cli import main

sys.exit(main())
