"""The CUDA side: kernel launchers (:mod:`~gpusaver.cuda.kernels`; the ``.cu`` sources are in ``kernels/``), the CPU
reference tests compare them against (:mod:`~gpusaver.cuda.reference`), and NVML (:mod:`~gpusaver.cuda.nvml`).

Nothing here imports CuPy or NVML at import time.
"""
