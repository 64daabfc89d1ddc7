"""``fedblend deploy``: run a config on a loopback Flower deployment; make dev certificates."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

deploy_app = typer.Typer(no_args_is_help=True, help="Run on Flower's deployment engine (SuperLink + SuperNodes).")


@deploy_app.command("local")
def local(
    config: Annotated[Path, typer.Argument(help="experiment config (TOML)")],
    nodes: Annotated[int, typer.Option("--nodes", min=1, help="SuperNodes (one per client)")] = 2,
    set_: Annotated[list[str] | None, typer.Option("--set", help="override: section.key=value")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="run directory (server side)")] = None,
    tls: Annotated[bool, typer.Option("--tls", help="TLS with a generated dev CA")] = False,
    auth: Annotated[bool, typer.Option("--auth", help="SuperNode authentication (implies --tls)")] = False,
    timeout: Annotated[float, typer.Option("--timeout", help="seconds to wait for the run")] = 3600,
    resume: Annotated[bool, typer.Option("--resume", help="continue the unfinished run in --out "
                                         "from its last checkpoint")] = False,
    gpus: Annotated[str | None, typer.Option("--gpus", help="GPU indices, e.g. 0,1: SuperNode i "
                                             "sees only GPU i mod len (CUDA_VISIBLE_DEVICES)")] = None,
) -> None:
    """Run CONFIG on a SuperLink and N SuperNodes started on 127.0.0.1.

    Collects the run directory and stops every process, also on failure or Ctrl-C.
    """
    from fedblend.config import load_config
    from fedblend.console import print_summary, user_errors
    from fedblend.deploy.local import deploy_local

    with user_errors():
        gpu_list = None
        if gpus is not None:
            from fedblend.deploy.gpus import check_gpus, parse_gpus

            gpu_list = parse_gpus(gpus)
            check_gpus(gpu_list)
        cfg = load_config(config, set_ or [])
        out_dir = out or Path("runs") / cfg.name
        summary, dep = deploy_local(config, nodes, set_ or [], out_dir, tls=tls or auth, auth=auth,
                                    timeout=timeout, resume=resume, gpus=gpu_list)
    print_summary(summary, out_dir)
    typer.echo(f"node state and local adapters: {dep.work / 'nodes'}")


@deploy_app.command("certs")
def certs(
    out: Annotated[Path, typer.Argument(help="directory for the CA, server cert and node keys")],
    nodes: Annotated[int, typer.Option("--nodes", min=1, help="node key pairs to make")] = 2,
) -> None:
    """Generate a self-signed development CA, a SuperLink certificate and SuperNode keys."""
    from fedblend.deploy.certs import make_certs

    c = make_certs(out, nodes=nodes)
    typer.echo(f"CA {c.ca}; server {c.server_cert} {c.server_key}; node keys {c.dir}/node_<i>[.pub]")
