"""`python -m timelit ...`: the `timelit` command, for an environment whose scripts folder is not on PATH."""

from timelit.cli import main

if __name__ == "__main__":
    main()
