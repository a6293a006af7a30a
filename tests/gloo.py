"""Two-process torch.distributed helpers for the tests (gloo on CPU, loopback only)."""
from __future__ import annotations

import socket
from contextlib import contextmanager
from typing import Iterator

import torch.distributed as dist


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def gloo_group(rank: int, world: int, port: int) -> Iterator[None]:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        yield
    finally:
        dist.destroy_process_group()
