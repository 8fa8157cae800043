"""Shared setup of the vLLM tests: headgain's ``vllm.general_plugins`` entry point, as an
installed headgain declares it (this venv imports headgain from the checkout, so the
entry point is written here as a distribution's metadata on ``sys.path``)."""

import os
import sys
import tempfile

ENTRY_POINT = "headgain = headgain.vllm:register"  # as setup.py declares it


def _declare_entry_point() -> str:
    """The folder (added to ``sys.path``) that holds the entry point's metadata."""
    root = tempfile.mkdtemp(prefix="headgain-entry-point-")
    info = os.path.join(root, "headgain-0.0.dist-info")
    os.makedirs(info)
    with open(os.path.join(info, "METADATA"), "w") as f:
        f.write("Metadata-Version: 2.1\nName: headgain\nVersion: 0.0\n")
    with open(os.path.join(info, "entry_points.txt"), "w") as f:
        f.write(f"[vllm.general_plugins]\n{ENTRY_POINT}\n")
    sys.path.append(root)
    return root


ENTRY_POINT_ROOT = _declare_entry_point()  # for PYTHONPATH of the vLLM processes tests start
