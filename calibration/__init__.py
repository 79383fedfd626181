"""mirasol.calibration: int8 post-training calibration."""
