"""Suite-wide settings every test and every child process inherits."""

import os

# operator/ at the repository root shadows the standard library's `operator` module in any
# `python -c`/`-m` child whose working directory is the root (multiprocessing spawn included).
os.environ["PYTHONSAFEPATH"] = "1"
# Two cores: one thread per rank, or ranks fight over them.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
