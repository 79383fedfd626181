"""mirasol.runtime.cli: the runtime's command lines, thin shells over the library: `commandline.py` (the one
argparse style every mirasol command shares), `run.py` (mirasol-run), `bundle_info.py` (`--info`)."""
