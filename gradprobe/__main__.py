import sys

from gradprobe.client.cli import main

sys.exit(main())
