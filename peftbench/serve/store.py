"""Which adapters a server answers for, and which of them are in memory.

The checkpoints named at start-up are loaded then and stay. With ``--adapters-dir DIR`` every checkpoint
in DIR (``DIR/NAME``, or a run folder ``DIR/NAME/checkpoint``) is servable by its folder name: read (its
metadata and files checked) at start-up, loaded on first use, and kept in a least-recently-used set of
``--max-loaded`` adapters; one not used for longest, with no request queued, is let go to make room, and
loaded again when asked for. An admin adds and removes adapters while the server runs; a removed adapter
answers the requests already queued for it, then leaves memory.

Loading reads the checkpoint on its own thread, beside the forward passes; only joining the shared base
(a few tensors moved into its tables) and leaving it run on the model thread, between passes.
"""

import asyncio
import re
import sys
import time
from collections import OrderedDict
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from peftbench.errors import PeftbenchError, clip
from peftbench.inference import loading, open_checkpoint
from peftbench.mixed import NotShareable, SharedBase
from peftbench.serve.adapters import Adapter, attach, describe_checkpoint, detach, read_adapter

NAME = re.compile(r"[A-Za-z0-9_.-]+")  # a folder name: ASCII letters, digits, '_', '.', '-' (no '#': ensembles')


class Refused(Exception):
    """An adapter that cannot be served (the message says why, naming its folder)."""


class Unavailable(Exception):
    """An adapter that could not be loaded for now (out of memory, a read that failed); the next request tries
    again."""


@dataclass
class Entry:
    name: str
    path: Path | None  # None: named at start-up (an ensemble, or a checkpoint given on the command line)
    meta: dict
    adapter: Adapter | None = None  # in memory
    pinned: bool = False  # named at start-up: stays in memory
    in_flight: int = 0  # requests that hold it
    removed: bool = False
    loading: asyncio.Future | None = None


def log(message: str) -> None:
    print(f"peftbench serve: {message}", file=sys.stderr, flush=True)


def read_entry(name: str, path: Path) -> Entry:
    """A folder's checkpoint, checked without loading its weights (files, metadata, labels); raises
    :class:`Refused`."""
    if not NAME.fullmatch(name) or name in (".", ".."):
        raise Refused(f"{path}: the folder name '{clip(name, 60)}' is not an adapter name (letters, digits, _ . -)")
    ckpt = path / "checkpoint" if (path / "checkpoint").is_dir() else path
    try:
        with loading(ckpt):
            meta = open_checkpoint(ckpt)
    except PeftbenchError as exc:
        raise Refused(str(exc)) from None
    return Entry(name, ckpt, meta)


class AdapterStore:
    """The adapters by name: pinned ones (named at start-up), and those of a folder or an admin, loaded on first
    use into a least-recently-used set of at most ``max_loaded``."""

    def __init__(self, pinned: dict[str, Adapter], device: str = "cpu", folder: Path | None = None,
                 max_loaded: int | None = None, bases: dict | None = None):
        self.device, self.folder, self.max_loaded = device, folder, max_loaded
        self.entries = {n: Entry(n, None, a.meta, a, pinned=True) for n, a in pinned.items()}
        self.bases: dict[tuple, SharedBase | NotShareable] = bases if bases is not None else {}
        self.recent: OrderedDict[str, Entry] = OrderedDict()  # loaded, not pinned; least recently used first
        self.draining: dict[str, Entry] = {}  # removed, answering the requests queued before
        self.model_thread: Executor | None = None  # the forward passes' thread (set by the server)
        self.load_thread = ThreadPoolExecutor(1, thread_name_prefix="load")
        self.on_load = lambda seconds: None  # metrics
        self.on_evict = lambda: None

    def scan(self) -> list[str]:
        """Every checkpoint of the folder becomes servable; returns a line per folder refused."""
        refused = []
        for path in sorted(p for p in self.folder.iterdir() if p.is_dir()):  # each folder alone
            if path.name in self.entries:
                refused.append(f"{path}: the name '{path.name}' is taken by an adapter named at start-up")
                continue
            try:
                self.entries[path.name] = read_entry(path.name, path)
            except Refused as exc:
                refused.append(str(exc))
        return refused

    def warm(self) -> str | None:
        """Load the folder's first adapter that loads, at start-up, so that no request pays for the libraries'
        first use (seconds); the ones that fail on the way are refused. Returns its name."""
        for name in [n for n, e in self.entries.items() if not e.pinned]:
            entry = self.entries[name]
            try:
                entry.adapter = attach(read_adapter(name, entry.path, self.device, self.bases))
            except PeftbenchError as exc:
                self._drop(entry)
                log(f"adapter '{name}' refused: {exc}")
                continue
            except Exception as exc:  # tried again on first use
                log(f"adapter '{name}' not loaded: {type(exc).__name__}: {exc}")
                continue
            self.recent[name] = entry
            return name
        return None

    def names(self) -> list[str]:
        return list(self.entries)

    def loaded(self) -> list[Adapter]:
        return [e.adapter for e in self.entries.values() if e.adapter is not None]

    def describe(self) -> list[dict]:
        """What ``GET /v1/adapters`` lists: a loaded adapter's description, or what its metadata tells."""
        out = []
        for name in self.names():
            entry = self.entries[name]
            if entry.adapter is not None:
                out.append({**entry.adapter.describe(), "loaded": True})
                continue
            out.append({**describe_checkpoint(name, entry.meta), "loaded": False})
        return out

    async def acquire(self, name: str) -> Entry:
        """The adapter's entry, its adapter loaded if it was not (KeyError: no such adapter; :class:`Refused`: it
        could not be loaded); held until :meth:`release`, so that it stays in memory meanwhile."""
        entry = self.entries.get(name)
        if entry is None:
            raise KeyError(name)
        entry.in_flight += 1
        try:
            while entry.adapter is None:
                if entry.removed:
                    raise Refused(f"adapter '{name}' could not be loaded")
                if entry.loading is None:
                    entry.loading = asyncio.ensure_future(self._load(entry))
                await asyncio.shield(entry.loading)
        except BaseException:
            entry.in_flight -= 1
            await self._let_go_if_drained(entry)  # refused while loading: the name is free again
            raise
        if not entry.pinned:
            self.recent.pop(name, None)
            self.recent[name] = entry
        return entry

    async def release(self, entry: Entry) -> None:
        entry.in_flight -= 1
        await self._let_go_if_drained(entry)
        await self._make_room()

    async def _let_go_if_drained(self, entry: Entry) -> None:
        """A removed entry leaves memory, and frees its name, once no request holds it."""
        if entry.removed and entry.in_flight == 0 and self.draining.get(entry.name) is entry:
            del self.draining[entry.name]
            await self._unload(entry)

    async def _load(self, entry: Entry) -> None:
        loop = asyncio.get_running_loop()
        try:
            start = time.perf_counter()
            loaded = await loop.run_in_executor(self.load_thread, read_adapter, entry.name, entry.path, self.device,
                                                self.bases)
            entry.adapter = await loop.run_in_executor(self.model_thread, attach, loaded)
            self.on_load(time.perf_counter() - start)
            if not entry.pinned:
                self.recent[entry.name] = entry
        except PeftbenchError as exc:  # the checkpoint: refused for good
            self._drop(entry)
            log(f"adapter '{entry.name}' refused: {exc}")
            raise Refused(f"adapter '{entry.name}' could not be loaded, and is no longer served: {clip(exc)}") \
                from None
        except Exception as exc:  # memory, the disk: the next request tries again
            log(f"adapter '{entry.name}' not loaded: {type(exc).__name__}: {exc}")
            raise Unavailable(f"adapter '{entry.name}' could not be loaded now ({type(exc).__name__}: "
                              f"{clip(exc)}); try again") from None
        finally:
            entry.loading = None
        await self._make_room()

    def _drop(self, entry: Entry) -> None:
        """Stop serving ``entry`` (new requests get 404); the name is free once no request holds it."""
        entry.removed = True
        if self.entries.get(entry.name) is entry:
            del self.entries[entry.name]
        if entry.in_flight > 0:  # loaded, or loading for a request: let go once the last request is answered
            self.draining[entry.name] = entry

    async def _make_room(self) -> None:
        """Let the least recently used adapters go, with no request holding them, until ``max_loaded`` fit."""
        if self.max_loaded is None:
            return
        while len(self.recent) > self.max_loaded:
            idle = next((e for e in self.recent.values() if e.in_flight == 0), None)
            if idle is None:
                return  # every one is in use: over the limit until requests finish
            await self._unload(idle)
            self.on_evict()

    async def _unload(self, entry: Entry) -> None:
        if self.recent.get(entry.name) is entry:
            del self.recent[entry.name]
        adapter, entry.adapter = entry.adapter, None
        for one in (adapter.members or [adapter]) if adapter is not None else ():
            await asyncio.get_running_loop().run_in_executor(self.model_thread, detach, one)

    async def add(self, name: str, path: Path) -> Adapter:
        """An admin's new adapter, loaded now (so that a bad one is refused to the admin, :class:`Refused`); a name
        in use, or still answering the requests queued before its removal, raises FileExistsError."""
        if name in self.entries or name in self.draining:
            raise FileExistsError(name)
        self.entries[name] = read_entry(name, path)
        entry = await self.acquire(name)
        try:
            return entry.adapter
        finally:
            await self.release(entry)

    async def remove(self, name: str) -> int:
        """Stop serving ``name`` (KeyError when it is not served); it leaves memory once the requests queued for it
        are answered. Returns how many were."""
        entry = self.entries.get(name)
        if entry is None:
            raise KeyError(name)
        self._drop(entry)
        waiting = entry.in_flight
        if waiting == 0:
            await self._unload(entry)
        return waiting
