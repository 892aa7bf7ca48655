# first, before anything imports grpc: common turns gRPC's fork handlers off (see common/__init__.py)
import common  # noqa: F401
