"""The client state store: each client's private state (FedDPA's local adapter, a compression
residual, anything an algorithm keeps per client) on disk, read for the clients a round
samples and written back after their update, so a round's memory and cost follow the sampled
clients, not the federation's size.

Layout under the store's root, one client ``c``::

    c.safetensors -> c/v<k>.safetensors   the pointer (a relative symlink) to the current version
    c/v<k>.safetensors                    version k: the state after k rounds (k = rounds completed)

A write puts the new version file in place first (temporary name, then a rename) and only
then swaps the pointer (a new symlink renamed over the old one), so a process killed between
any two of these steps leaves the pointer on the last complete version. Loading the pointer
with :func:`fedblend.store.files.load_state` therefore always reads a whole state.

Resuming from a checkpoint taken after round ``R`` must not see versions a crashed round
wrote after it: :attr:`ClientStore.limit` makes clients not yet written by this process read
their newest version ``<= R``. Old versions are removed when a client is written, except the
newest one at or before the last checkpoint (:attr:`ClientStore.committed`), which a resume may
still need.

Self-contained (no dependency on the run directory's layout) so that any engine, or a Flower
node, can hold one.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable, Iterator, MutableMapping
from pathlib import Path

from fedblend.comm.codec import State
from fedblend.store.files import load_state, save_state

_VERSION = re.compile(r"^(?:\d+/)?v(\d+)\.safetensors$")


class ClientStore(MutableMapping[int, State]):
    """Client id -> private state, on disk. Reading a client never stored gives
    ``init(cid)`` (the algorithm's fresh state; ``{}`` without ``init``), computed when asked for.

    ``version``: the version the next writes get (the round loop sets it to the rounds completed
    at the end of the round under way). ``committed``: the version of the last checkpoint (old
    versions up to it are kept, one per client). ``limit``: on resume, the checkpoint's version.
    ``loads`` / ``saves`` count disk reads and writes (for tests and benchmarks)."""

    def __init__(self, root: str | Path, init: Callable[[int], State] | None = None, keep_committed: bool = True) -> None:
        self.root = Path(root)
        self.init = init
        self.keep_committed = keep_committed
        self.version = 0
        self.committed = 0
        self.limit: int | None = None
        self.loads = 0
        self.saves = 0
        self._written: set[int] = set()

    # ---- paths ----------------------------------------------------------------------------
    def pointer(self, cid: int) -> Path:
        return self.root / f"{cid}.safetensors"

    def _version_path(self, cid: int, version: int) -> Path:
        return self.root / str(cid) / f"v{version}.safetensors"

    def versions(self, cid: int) -> list[int]:
        """The versions of ``cid`` on disk, oldest first."""
        d = self.root / str(cid)
        if not d.is_dir():
            return []
        return sorted(int(m.group(1)) for p in d.iterdir() if (m := _VERSION.match(p.name)))

    def current_version(self, cid: int) -> int | None:
        """The version the pointer names (None: the client was never written)."""
        try:
            target = os.readlink(self.pointer(cid))
        except (FileNotFoundError, OSError):
            return None
        m = _VERSION.match(target)
        return int(m.group(1)) if m else None

    # ---- reading --------------------------------------------------------------------------
    def _readable_version(self, cid: int) -> int | None:
        v = self.current_version(cid)
        if v is None or self.limit is None or cid in self._written or v <= self.limit:
            return v
        older = [k for k in self.versions(cid) if k <= self.limit]
        return older[-1] if older else None

    def __getitem__(self, cid: int) -> State:
        v = self._readable_version(cid)
        if v is None:
            legacy = self.pointer(cid)  # a checkpoint written before the store: one plain file per client
            if legacy.is_file() and not legacy.is_symlink():
                self.loads += 1
                return load_state(legacy)
            if self.init is None:
                raise KeyError(cid)
            return self.init(cid)
        self.loads += 1
        return load_state(self._version_path(cid, v))

    def get(self, cid: int, default: State | None = None) -> State:  # type: ignore[override]
        try:
            return self[cid]
        except KeyError:
            return {} if default is None else default

    def __contains__(self, cid: object) -> bool:
        return isinstance(cid, int) and self._readable_version(cid) is not None

    # ---- writing --------------------------------------------------------------------------
    def __setitem__(self, cid: int, state: State) -> None:
        """Write ``state`` as version :attr:`version` of ``cid``: the version file, then the pointer."""
        v = self.version
        save_state(self._version_path(cid, v), state)  # a temporary file renamed into place
        link = self.root / f".{cid}.safetensors.link"
        if link.is_symlink() or link.exists():
            link.unlink()
        os.symlink(f"{cid}/v{v}.safetensors", link)
        os.replace(link, self.pointer(cid))  # the switch: atomic
        self._written.add(cid)
        self.saves += 1
        self._collect(cid, v)

    def _collect(self, cid: int, current: int) -> None:
        """Remove versions no reader can ask for: older than the current one, except the newest
        at or before the last checkpoint (while checkpoints are kept)."""
        old = [k for k in self.versions(cid) if k != current]
        keep = None
        if self.keep_committed:
            held = [k for k in old if k <= self.committed]
            keep = held[-1] if held else None
        for k in old:
            if k != keep and k < current:
                self._version_path(cid, k).unlink(missing_ok=True)

    def __delitem__(self, cid: int) -> None:
        self.pointer(cid).unlink(missing_ok=True)
        for k in self.versions(cid):
            self._version_path(cid, k).unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            (self.root / str(cid)).rmdir()
        self._written.discard(cid)

    # ---- listing --------------------------------------------------------------------------
    def __iter__(self) -> Iterator[int]:
        if not self.root.is_dir():
            return iter(())
        ids = sorted(int(p.name.split(".", 1)[0]) for p in self.root.iterdir()
                     if p.is_symlink() and p.name.endswith(".safetensors") and p.name.split(".", 1)[0].isdigit())
        return iter([c for c in ids if c in self])

    def __len__(self) -> int:
        return sum(1 for _ in self)
