"""The rig fixtures for the KcoreSource rig test in this folder."""

from tests.rig.conftest import rig, rig_config  # noqa: F401 - re-exported fixtures
