"""The README's Python example runs as it is."""

import os
import re
import subprocess
import sys

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def test_readme_example_runs(tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", open(README).read(), flags=re.S)
    assert blocks, "README has no python example"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    for code in blocks:
        out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr[-2000:]
        assert "loss" in out.stdout
