"""The rig: a simulated physical host P (a QEMU/TCG guest running Debian's kernel), a destination host
V (network namespace p2v-dest + libvirtd) and an outside client (namespace p2v-client), on one box.

    from rig import Rig
    rig = Rig(); rig.start()          # build (cached), network, libvirtd, boot P, workloads, client
    rig.run("cat /proc/mdstat")       # a command inside P over its serial control channel
    rig.counter_stats(); rig.tcp_stats(); rig.verify_files(); rig.power_state()
    rig.stop()                        # removes everything (also: python -m rig down)

See rig/README.md.
"""

from rig.config import RigConfig
from rig.core import AgentState, Rig

__all__ = ["AgentState", "Rig", "RigConfig"]
