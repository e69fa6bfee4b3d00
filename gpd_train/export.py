"""``python -m gpd_train.export``: the export CLI (gpd_train.infer.export)."""

from gpd_train.infer.export import main

if __name__ == "__main__":
    main()
