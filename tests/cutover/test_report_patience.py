"""The agent in the VM keeps reporting to V while V's agent is unreachable (restarting), and stops at
once when V refuses (source_agent/cutover.py patiently). The retry policy, on calls that raise what
gRPC raises; the reports over a real gRPC socket run in tests/cutover/test_resolve.py and the rig."""

from __future__ import annotations

import grpc
import pytest

from common.rpc import unreachable
from source_agent.cutover import patiently


def rpc_error(code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=f"{code.name} here")


class Calls:
    def __init__(self, *outcomes: object) -> None:
        self.outcomes, self.count = list(outcomes), 0

    async def __call__(self) -> object:
        self.count += 1
        outcome = self.outcomes.pop(0)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome


def test_what_counts_as_unreachable() -> None:
    assert unreachable(rpc_error(grpc.StatusCode.UNAVAILABLE))
    assert unreachable(rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED))
    assert unreachable(ConnectionRefusedError())
    assert not unreachable(rpc_error(grpc.StatusCode.NOT_FOUND))
    assert not unreachable(rpc_error(grpc.StatusCode.FAILED_PRECONDITION))
    assert not unreachable(ValueError("a bug"))


async def test_retries_while_v_is_unreachable_then_answers() -> None:
    call = Calls(rpc_error(grpc.StatusCode.UNAVAILABLE), rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED), "answer")
    assert await patiently(call, "reporting", patience_s=5, first_delay_s=0.01) == "answer"
    assert call.count == 3


async def test_a_refusal_is_not_retried() -> None:
    call = Calls(rpc_error(grpc.StatusCode.NOT_FOUND), "never asked")
    with pytest.raises(RuntimeError, match="reporting: V refused: NOT_FOUND: NOT_FOUND here"):
        await patiently(call, "reporting", patience_s=5, first_delay_s=0.01)
    assert call.count == 1


async def test_gives_up_after_its_patience() -> None:
    call = Calls(*[rpc_error(grpc.StatusCode.UNAVAILABLE)] * 50)
    with pytest.raises(RuntimeError, match=r"reporting: no answer from V after \d+ attempts"):
        await patiently(call, "reporting", patience_s=0.2, first_delay_s=0.02, max_delay_s=0.05)
    assert 3 <= call.count < 50
