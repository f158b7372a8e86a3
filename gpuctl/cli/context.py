"""The CLI's injectable environment (à la httpie's ``Environment``).

Commands never reach for ``os.environ``, the real keyring, the real cloud or the real clock
themselves: they ask the ``AppContext``. ``gpuctl`` builds the default one; tests build one
with a fake cloud, a temp home and an in-memory keyring and pass it as Typer's ``obj``.
Everything heavy (pydantic config, httpx, the engine) is imported when a command first
needs it, so ``gpuctl --help`` and shell completion start fast.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from keyring.backend import KeyringBackend
    from rich.console import Console

    from gpuctl.cloud.base import CloudProvider
    from gpuctl.config import Config, LoadedConfig
    from gpuctl.credentials import Credentials
    from gpuctl.engine.clock import Clock
    from gpuctl.engine.engine import Engine
    from gpuctl.store import Store

__all__ = ["AppContext", "CloudFactory", "EngineFactory", "run_sync"]

T = TypeVar("T")

CloudFactory = Callable[["Config", "Credentials"], "CloudProvider"]
EngineFactory = Callable[["Config", "CloudProvider", "Store"], "Engine"]


@dataclass
class AppContext:
    """What a command may touch. Every field has a production default."""

    env: Mapping[str, str] = field(default_factory=lambda: os.environ)
    config_file: Path | None = None
    debug: bool = False
    keyring_backend: KeyringBackend | None = None
    cloud_factory: CloudFactory | None = None
    engine_factory: EngineFactory | None = None
    clock: Clock | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    _loaded: LoadedConfig | None = field(default=None, repr=False)
    _out: Console | None = field(default=None, repr=False)
    _err: Console | None = field(default=None, repr=False)

    @classmethod
    def of(cls, ctx: Any) -> AppContext:
        """The context of the running command (a ``typer.Context``), installed by ``main``'s
        callback; a default one when a sub-app runs on its own (its tests, for example)."""
        root = ctx.find_root()
        if not isinstance(root.obj, cls):
            root.obj = cls()
        obj: AppContext = root.obj
        return obj

    # -- config ---------------------------------------------------------------------------

    def loaded(self) -> LoadedConfig:
        """The merged config (flag > env > file > default), loaded once per command."""
        if self._loaded is None:
            from gpuctl.config import load_config

            self._loaded = load_config(self.config_file, env=self.env, overrides=self.overrides)
        return self._loaded

    @property
    def config(self) -> Config:
        return self.loaded().config

    def cache_dir(self) -> Path:
        from gpuctl.config import cache_dir

        return cache_dir(self.env)

    # -- consoles -------------------------------------------------------------------------

    @property
    def out(self) -> Console:
        """Data: tables. (JSON is written raw, see ``output.emit_json``.)"""
        if self._out is None:
            from rich.console import Console

            console = Console()
            if not console.is_terminal:
                # Piped: no terminal width to fit; never cut a name or an id short.
                console.width = 1000
            self._out = console
        return self._out

    @property
    def err(self) -> Console:
        """Messages, spinners, errors."""
        if self._err is None:
            from rich.console import Console

            # soft_wrap: messages are never hard-wrapped at 80 columns in logs and pipes.
            self._err = Console(stderr=True, highlight=False, soft_wrap=True)
        return self._err

    # -- collaborators --------------------------------------------------------------------

    def credentials(self) -> Credentials:
        from gpuctl.credentials import Credentials

        return Credentials(self.env, keyring_backend=self.keyring_backend)

    def node_token(self) -> str | None:
        """The GPU nodes' token, wherever ``Credentials`` found it (environment, credential
        file or keyring): the one source for the engine's probes and the gateway's proxy."""
        found = self.credentials().find("node_token")
        return found.value if found else None

    def cloud(self) -> CloudProvider:
        """The configured provider; a missing token fails here with exit 4."""
        if self.cloud_factory is not None:
            return self.cloud_factory(self.config, self.credentials())
        from gpuctl.cloud import make_provider

        return make_provider(self.config, self.credentials())

    def open_store(self, *, reader: bool = False) -> Store:
        """The engine's store; ``reader`` for every command but the gateway (``serve``), so
        that only the gateway writes leases and usage."""
        from gpuctl.config import state_dir
        from gpuctl.store import Store

        return Store.open(state_dir(self.config, self.env), reader=reader)

    def make_engine(self, cloud: CloudProvider, store: Store, *,
                    observe_fleet: bool = True) -> Engine:
        """``observe_fleet=False`` for one command: it records its own actions on the
        ledger, not the fleet it happens to see (the gateway is that record's one writer)."""
        if self.engine_factory is not None:
            return self.engine_factory(self.config, cloud, store)
        from gpuctl.engine.engine import Engine

        return Engine(self.config, cloud, store, clock=self.clock, observe_fleet=observe_fleet,
                      node_token=self.node_token())

    @contextlib.asynccontextmanager
    async def engine_session(self) -> AsyncIterator[Engine]:
        """An engine over the configured cloud and store, torn down in reverse order.

        The store is opened as a reader: a laptop command beside a live gateway shows the
        gateway's leases but never writes leases or usage back (it owns neither).
        """
        cloud = self.cloud()
        try:
            store = self.open_store(reader=True)
            try:
                engine = self.make_engine(cloud, store, observe_fleet=False)
                try:
                    yield engine
                finally:
                    await engine.stop()
            finally:
                store.close()
        finally:
            await cloud.aclose()


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run one coroutine to completion: each command is one short-lived event loop."""
    import asyncio  # lazy: keeps `gpuctl --help` and TAB fast

    return asyncio.run(coro)

