"""Load the reference ``imagecorruptions`` 1.1.2 on NumPy 2 and scikit-image >= 0.19.

The package predates both: it uses ``np.float_`` (removed in NumPy 2) and calls
``skimage.filters.gaussian(..., multichannel=True)`` (now ``channel_axis=-1``). This test-only
shim patches the two names inside the reference module (never in ``tta``, never globally in
NumPy) and silences its deprecated imports (``pkg_resources``, ``scipy.ndimage.interpolation``).
"""
from __future__ import annotations

import types
import warnings

import numpy as np
import skimage.filters


class _NumpyWithFloat_(types.ModuleType):
    """``numpy`` as seen by the reference module, plus the removed alias ``float_``."""

    float_ = np.float64

    def __getattr__(self, name: str):
        return getattr(np, name)


def _gaussian(image, sigma=1, multichannel=None, **kwargs):
    if multichannel:
        kwargs["channel_axis"] = -1
    return skimage.filters.gaussian(image, sigma=sigma, **kwargs)


def load_imagecorruptions() -> types.ModuleType:
    """Import ``imagecorruptions`` with the compatibility patches applied; returns the package."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import imagecorruptions
        from imagecorruptions import corruptions as reference
    reference.np = _NumpyWithFloat_("numpy")
    reference.gaussian = _gaussian
    return imagecorruptions


def with_parameters(function: types.FunctionType, parameters) -> types.FunctionType:
    """The reference corruption ``function`` with its table of five per-severity parameters (a
    constant of its code) replaced by ``parameters`` at every severity: called at any severity
    1..5, it runs the reference algorithm at ``parameters`` (the continuous severities' tests)."""
    code = function.__code__
    tables = [i for i, c in enumerate(code.co_consts) if isinstance(c, tuple) and len(c) == 5]
    if len(tables) != 1:
        raise ValueError(f"{function.__name__}: expected one table of 5 parameters among its constants")
    consts = list(code.co_consts)
    consts[tables[0]] = (parameters,) * 5
    return types.FunctionType(code.replace(co_consts=tuple(consts)), function.__globals__, function.__name__,
                              function.__defaults__, function.__closure__)
