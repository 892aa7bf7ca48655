"""The rig fixtures (tests/rig/conftest.py) for the redundancy rig tests in this folder."""

from tests.rig.conftest import rig, rig_config  # noqa: F401 - re-exported fixtures
