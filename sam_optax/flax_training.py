"""The earlier name of :mod:`sam_optax.flax` (deprecated: it warns, and goes in the next release).

``from sam_optax import flax_training as ft`` still gives every name of :mod:`sam_optax.flax`;
write ``from sam_optax import flax as ft`` instead.
"""

import warnings

from sam_optax.flax import *  # noqa: F403
from sam_optax.flax import __all__  # noqa: F401

warnings.warn("`sam_optax.flax_training` is deprecated and will be removed in the next release; "
              "import `sam_optax.flax` instead (the same names).", DeprecationWarning, stacklevel=2)
