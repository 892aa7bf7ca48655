"""Shared parts of both agents and p2vctl.

gRPC core's fork handlers are on by default in grpcio 1.85 and crash children forked while other
threads are inside gRPC (measured: 17 of 300 `fork+exec` children died of SIGSEGV under RPC load).
The agents fork only to exec (modprobe, mdadm, the cutover helper), which needs no handlers: they are
turned off here. gRPC reads the setting when it is imported, so the agents' and p2vctl's packages import
this one first (their __init__). tests/foundation/test_fork_safety.py.
"""

import os

os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
