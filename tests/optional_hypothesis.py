"""hypothesis where it is installed; where it is not, stand-ins that skip the property tests only.

A GPU machine with no package index may lack hypothesis (a test extra): the other tests of a file
that has property tests still run there. Import from here instead of from hypothesis:
`from optional_hypothesis import HealthCheck, given, settings, st`.
"""

import pytest

try:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError:  # the stand-ins below

    class _Anything:
        """Absorbs every strategy expression written at import time (`st.lists(...).flatmap(...)`)."""

        def __getattr__(self, name):
            return self

        def __call__(self, *args, **kwargs):
            return self

    st = HealthCheck = _Anything()

    def settings(*args, **kwargs):
        return lambda f: f

    def given(*args, **kwargs):
        def decorate(f):
            def skipped():
                pytest.skip("hypothesis is not installed: this property test needs it (pip install hypothesis)")

            skipped.__name__, skipped.__doc__ = f.__name__, f.__doc__
            return skipped

        return decorate

__all__ = ["HealthCheck", "given", "settings", "st"]
