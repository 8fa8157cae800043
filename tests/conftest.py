import os
import warnings

import pytest
import torch


def pytest_sessionstart(session):
    if os.environ.get("HEADGAIN_REQUIRE_EXTENSION") == "1":
        import headgain
        from headgain.core import ops

        if not headgain.extension_available():
            raise pytest.UsageError(
                f"HEADGAIN_REQUIRE_EXTENSION=1 but headgain._C did not load: {ops.extension_error()}"
            )


@pytest.fixture
def one_thread_quiet():
    """One torch thread (tiny matrices: threads only add overhead), RuntimeWarnings ignored."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield
    torch.set_num_threads(threads)
