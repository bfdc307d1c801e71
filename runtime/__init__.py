"""ggufile runtime: what runs inside the executable (reader, tokenizers, model, CLI, server)."""
import os

__version__ = "0.1.0"

# The kernels' thread pool already splits every matmul's rows across the cores; BLAS threads
# inside each pool thread would oversubscribe them (measured: prefill 245 -> 20 tok/s under
# load). Must be set before NumPy is first imported; a user's explicit setting wins.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
