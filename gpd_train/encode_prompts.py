"""``python -m gpd_train.encode_prompts``: prompts to an embedding set
(gpd_train.data.encode_prompts)."""

import sys

from gpd_train.data.encode_prompts import main

if __name__ == "__main__":
    sys.exit(main())
