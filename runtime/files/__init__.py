"""mirasol.runtime.files: how the toolkit writes to disk: the ownership rule for outputs (`ownership.py`) and
atomic files and directories (`atomic.py`)."""
