"""The run store: the run directory and its status (:mod:`.rundir`), and crash-safe tensor
files and checkpoints (:mod:`.files`)."""
