"""Test-only fault injection for Flower deployments, switched on by environment variables
that the deployment's daemons inherit. Never set them outside tests.

- ``FEDBLEND_FAULT_KILL_NODE="<cid>:<round>"``: client ``cid``'s ClientApp SIGKILLs the SuperNode
  it runs under and everything the SuperNode started (its SuperExec, this ClientApp)
  before training ``round``: a node that dies mid-round and never answers again.
- ``FEDBLEND_FAULT_KILL_SERVER="<round>"``: the ServerApp SIGKILLs itself once the replies of
  ``round`` have arrived, before aggregating them: a server that dies after the nodes trained a
  round the last checkpoint does not contain.
"""

from __future__ import annotations

import contextlib
import os
import signal

KILL_SERVER_ENV = "FEDBLEND_FAULT_KILL_SERVER"
KILL_NODE_ENV = "FEDBLEND_FAULT_KILL_NODE"


def _spec(env: str) -> list[float] | None:
    raw = os.environ.get(env, "").strip()
    if not raw:
        return None
    try:
        return [float(x) for x in raw.split(":")]
    except ValueError:
        raise ValueError(f"{env}={raw!r}: expected numbers separated by ':'") from None


def maybe_kill_node(cid: int, rnd: int) -> None:
    spec = _spec(KILL_NODE_ENV)
    if spec is None or len(spec) != 2 or (int(spec[0]), int(spec[1])) != (cid, rnd):
        return
    import psutil

    me = psutil.Process()
    node = next((p for p in me.parents() if any("flower-supernode" in a for a in p.cmdline())), None)
    if node is None:
        raise RuntimeError(f"{KILL_NODE_ENV}: this ClientApp does not run under a flower-supernode")
    rest = [p for p in node.children(recursive=True) if p.pid != me.pid]
    for p in [node, *rest]:  # the SuperNode first, then its SuperExec (and other apps), then us
        with contextlib.suppress(psutil.Error):
            p.send_signal(signal.SIGKILL)
    os.kill(me.pid, signal.SIGKILL)


def maybe_kill_server(rnd: int) -> None:
    spec = _spec(KILL_SERVER_ENV)
    if spec is not None and int(spec[0]) == rnd:
        os.kill(os.getpid(), signal.SIGKILL)
