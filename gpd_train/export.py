"""``python -m gpd_train.export``: the export CLI (gpd_train.infer.export.cli)."""

import sys

from gpd_train.infer.export.cli import main

if __name__ == "__main__":
    sys.exit(main())
