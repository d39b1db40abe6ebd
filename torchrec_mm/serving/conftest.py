"""Fixtures of the item-store tests: one ``redis-server`` per session (on a free port,
data in a temp dir, stopped at the end) and a factory of fresh stores per backend."""

import itertools
import os
import uuid
from typing import Callable, Iterator, Optional

import pytest

from torchrec_mm.serving.schema import StoreSchema
from torchrec_mm.serving.store import ItemStore
from torchrec_mm.serving.testing import RedisServer, redis_server_binary

NO_REDIS = ("redis-server is not installed (Debian: apt-get install redis-server); "
            "the Redis backend tests are skipped")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory) -> Iterator[RedisServer]:
    if redis_server_binary() is None:
        pytest.skip(NO_REDIS)
    try:
        import redis  # noqa: F401
    except ImportError:
        pytest.skip("the python package 'redis' is not installed (requirements/cpu.txt)")
    server = RedisServer(str(tmp_path_factory.mktemp("redis")))
    server.start()
    try:
        yield server
    finally:
        server.close()


class StoreFactory:
    """Fresh, empty store locations of one backend."""

    def __init__(self, backend: str, root: str, server: Optional[RedisServer]) -> None:
        self.backend = backend
        self.root = root
        self.server = server
        self._n = itertools.count()

    def location(self) -> str:
        k = next(self._n)
        if self.backend == "redis":
            assert self.server is not None
            return self.server.url(f"test-{uuid.uuid4().hex[:12]}")
        if self.backend == "sqlite":
            return os.path.join(self.root, f"store{k}.db")
        return os.path.join(self.root, f"store{k}")

    def open(self, schema: Optional[StoreSchema], location: Optional[str] = None,
             **kwargs) -> ItemStore:
        return ItemStore.open(location or self.location(), schema, **kwargs)


@pytest.fixture(params=["mmap", "sqlite", "redis"])
def stores(request, tmp_path) -> StoreFactory:
    server = request.getfixturevalue("redis_server") if request.param == "redis" else None
    return StoreFactory(request.param, str(tmp_path), server)


@pytest.fixture
def make_store(stores) -> Callable[..., ItemStore]:
    opened = []

    def make(schema: Optional[StoreSchema], location: Optional[str] = None, **kw) -> ItemStore:
        s = stores.open(schema, location, **kw)
        opened.append(s)
        return s

    yield make
    for s in opened:
        s.close()
