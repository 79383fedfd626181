"""mirasol.calibration: post-training precision transforms, the library the exporter drives.

fp16.py (fp16 conversion with measured fp32 groups), data.py (calibration sources), record.py (recording
backend), quantize.py (int8 calibration primitives, `CalibrationOptions`), groups.py (sensitivity-sweep groups),
int8_targets.py (cpu / cpu-dynamic / tensorrt, and the measurements behind them), report.py (the int8 accuracy
report); the measurements themselves: `python -m mirasol.export.bench.int8_options`. An int8 bundle is written by
the exporter:

    from mirasol.calibration.quantize import CalibrationOptions
    from mirasol.export.bundle import export_bundle
    export_bundle(model, "bundles/small-int8", "int8", calibration=CalibrationOptions("clips/", target="cpu"))
"""
