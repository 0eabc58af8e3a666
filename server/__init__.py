"""The ckptd daemon: one shared checkpoint cache per host, served to worker processes.

Built on the embedded engine (``ckptd.load``); its HTTP layer knows nothing of CUDA.
"""
