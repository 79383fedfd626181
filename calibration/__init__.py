"""mirasol.calibration: post-training precision transforms, the library the exporter drives.

fp16.py (fp16 conversion with measured fp32 groups), int4.py (int4 weight blocks), kv_cache.py (the AV KV cache in
int8), data.py (calibration sources), ranges.py (activation ranges accumulated per call as the clips stream),
record.py and samples.py (observing what each graph sees; sampled calls on disk), quantize.py (int8 calibration
primitives, `CalibrationOptions`), groups.py (sensitivity-sweep groups), int8_targets.py (cpu / cpu-dynamic /
tensorrt, and the measurements behind them), report.py (the accuracy report of a quantized bundle),
external_data.py (graphs whose weights live beside them, a tensor at a time: how mirasol3b fits); the int8
measurements themselves: `python -m mirasol.export.bench.int8_options`. Bundles are written by the exporter:

    from mirasol.calibration.quantize import CalibrationOptions
    from mirasol.export.bundle import export_bundle
    export_bundle(model, "bundles/small-int8", "int8", calibration=CalibrationOptions("clips/", target="cpu"))
    export_bundle(model, "bundles/small-int4", "int4", kv="int8", calibration=CalibrationOptions("clips/"))
"""
