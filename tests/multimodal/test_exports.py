"""lmstack.multimodal's public names resolve, lazily: importing the package loads no torch model code."""
import subprocess
import sys

import lmstack.multimodal as mm


def test_every_public_name_resolves():
    assert mm.__all__ and all(getattr(mm, name) is not None for name in mm.__all__)


def test_the_package_itself_stays_light():
    code = "import sys, lmstack.multimodal; print('lmstack.multimodal.vlm' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False"
