import sys

from wanpipe.serving.cli import main

sys.exit(main())
