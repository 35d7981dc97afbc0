"""The README's config and error tables are generated from the code; they must not drift."""
from __future__ import annotations

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_readme_tables_match_the_code():
    proc = subprocess.run([sys.executable, "docs/gen_config_table.py", "--check"], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
