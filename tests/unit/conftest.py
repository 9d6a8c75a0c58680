"""Puts the repository root on sys.path, so that the tests import cdipy the
way cdi.py does, whatever directory pytest runs from."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
