import os

import pytest


def pytest_sessionstart(session):
    if os.environ.get("HEADGAIN_REQUIRE_EXTENSION") == "1":
        import headgain
        from headgain import ops

        if not headgain.extension_available():
            raise pytest.UsageError(f"HEADGAIN_REQUIRE_EXTENSION=1 but headgain._C did not load: {ops.extension_error()}")
