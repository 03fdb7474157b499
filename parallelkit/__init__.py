"""parallelkit: tensor, pipeline, data and context parallelism for PyTorch transformers.

The native extension ``parallelkit._C`` is loaded on first use (``import torch`` comes first);
``parallelkit.mpu`` builds the process groups; ``parallelkit.build_info()`` says what was compiled.
"""

__version__ = "0.1.0"

from parallelkit.about import build_info  # noqa: E402  (loads _C only when called)
from parallelkit.distributed import mpu  # noqa: E402

__all__ = ["__version__", "build_info", "mpu"]
