"""mirasol.calibration: int8 post-training calibration on real data, with an accuracy report.

    from mirasol.calibration.quantize import export_int8_bundle
    export_int8_bundle(model, "bundles/small-int8", "clips/", flavour="cpu", method="minmax")

data.py (calibration sources), record.py (recording backend), groups.py (sensitivity-sweep groups),
flavours.py (cpu / cpu-dynamic / tensorrt, and the measurements behind them), quantize.py (the export),
report.py (the accuracy report), bench.py (`python -m mirasol.calibration.bench`).
"""
