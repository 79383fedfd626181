"""mirasol.runtime.files: how the toolkit writes to disk: the ownership rule for outputs (`ownership.py`: may this
path be written?), the one mechanism every writer goes through (`atomic.py`: atomic files and directories, checked
again as they are put in place) and copying only listed, regular files (`copying.py`)."""
