"""`python -m cluster.docgen [--check]`: rewrite the generated reference pages, or (--check)
exit 1 naming the stale ones."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cluster.docgen import REGENERATE, REPO, stale_pages, write_pages


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cluster.docgen", description=__doc__)
    ap.add_argument("--check", action="store_true", help="write nothing; exit 1 if a page is stale")
    ap.add_argument("--root", type=Path, default=REPO, help="the repository the pages are under")
    args = ap.parse_args(argv)
    if args.check:
        stale = stale_pages(args.root)
        for path in stale:
            print(f"{path} is stale: run `{REGENERATE}`", file=sys.stderr)
        return 1 if stale else 0
    for path in write_pages(args.root):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
