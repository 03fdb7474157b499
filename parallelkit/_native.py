"""Loads the native extension ``parallelkit._C``; ``native`` is the module.

Importing it also registers the ``torch.ops.parallelkit.*`` operators.
"""

import torch  # _C links against libtorch: torch must be loaded first

try:
    from parallelkit import _C as native
except ImportError as error:
    raise ImportError(
        f"parallelkit._C did not load ({error}). Either it is not built, or it was built against "
        f"another torch than the installed {torch.__version__}. Rebuild it from the repo root "
        "with: pip install --no-build-isolation -e ."
    ) from error

__all__ = ["native"]
