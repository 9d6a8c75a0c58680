"""Puts tests/ on sys.path, so that the unit tests and the end-to-end lab
share tars.py, the one builder of tar archives."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
