#!/usr/bin/env python3
"""`python export.py ...` = the `walt-export` command (see walt_export/cli.py)."""

import sys

from walt_export.cli import main

if __name__ == "__main__":
    sys.exit(main())
