"""``python -m gpd_train.report_html``: rebuild eval/report.html (gpd_train.eval.report_html)."""

import sys

from gpd_train.eval.report_html import main

if __name__ == "__main__":
    sys.exit(main())
