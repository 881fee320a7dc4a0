"""First-party stem executors, registered through the ``stem.executors`` entry-point group.

Imported as ``stem_backends`` (the folder is ``backends/``). Modules here must not import triton or
kernels at import time: each executor imports its toolkit lazily and reports when it is missing.
"""
