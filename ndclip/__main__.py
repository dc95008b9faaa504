"""`python -m ndclip`: the `ndclip` command, for environments where the console script is not on the PATH."""

from ndclip.cli import main

if __name__ == "__main__":
    main()
