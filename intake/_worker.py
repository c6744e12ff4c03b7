"""The worker process of `intake.runner`: ``python -m intake._worker FD``.

Thread-count variables are set before numpy and friends are imported: OpenBLAS reserves memory
per thread (it matters under RLIMIT_AS) and OpenMP is much slower than one thread on 2 vCPU.
"""

import os
import sys

for _name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "OMP_THREAD_LIMIT", "MKL_NUM_THREADS"):
    os.environ.setdefault(_name, "1")

from multiprocessing.connection import Connection  # noqa: E402

import intake.check  # noqa: E402, F401 - imported before the first job so each job is warm
from intake.runner import _worker_main  # noqa: E402

if __name__ == "__main__":
    _worker_main(Connection(int(sys.argv[1])))
