"""``python -m gpd_train.sample``: the sampler CLI (gpd_train.infer.sample)."""

import sys

from gpd_train.infer.sample import main

if __name__ == "__main__":
    sys.exit(main())
