import sys

from openrlhf_search.cli import main

sys.exit(main())
