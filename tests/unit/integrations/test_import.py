"""`import dirtune.integrations` stays light: transformers (and TRL) load only when a name is used."""

from __future__ import annotations

import subprocess
import sys


def test_import_loads_no_transformers():
    code = ("import sys, dirtune.integrations as i; assert 'transformers' not in sys.modules; "
            "i.attach; assert 'transformers' in sys.modules and 'trl' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
