"""`python -m timelit ...`: the `timelit` command, for an environment whose scripts folder is not on PATH."""

import sys

from timelit.commands.cli import main

if __name__ == "__main__":
    sys.argv[0] = "timelit"  # what --help and usage lines name, as under the `timelit` script
    main()
