"""The simulated LAN (network namespaces joined by a bridge) for the tests. The code lives
in scripts/netlab.py, which scripts/lan_demo.py uses too; tests import it from here."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

from netlab import Host, SimulatedLan, unavailable

__all__ = ["Host", "SimulatedLan", "unavailable"]
