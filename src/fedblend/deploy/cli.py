"""``fedblend deploy``: run a config on a loopback Flower deployment; make dev certificates."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

deploy_app = typer.Typer(no_args_is_help=True, help="Run on Flower: its deployment engine (SuperLink + "
                         "SuperNodes) or its simulation runtime (virtual SuperNodes on Ray).")


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
    from fedblend.deploy.local import check_resume, deploy_local

    with user_errors():
        gpu_list = None
        if gpus is not None:
            from fedblend.deploy.gpus import check_gpus, parse_gpus

            gpu_list = parse_gpus(gpus)
            check_gpus(gpu_list)
        cfg = load_config(config, set_ or [])
        out_dir = out or Path("runs") / cfg.name
        if note := check_resume(out_dir.resolve(), resume):
            typer.echo(note, err=True)
        summary, dep = deploy_local(config, nodes, set_ or [], out_dir, tls=tls or auth, auth=auth,
                                    timeout=timeout, resume=resume, gpus=gpu_list)
    print_summary(summary, out_dir)
    typer.echo(f"node state and local adapters: {dep.work / 'nodes'}")


@deploy_app.command("sim")
def sim(
    config: Annotated[Path, typer.Argument(help="experiment config (TOML)")],
    nodes: Annotated[int | None, typer.Option("--nodes", min=1, help="virtual SuperNodes, one per "
                                              "client (default: the config's clients)")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="override: section.key=value")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="run directory")] = None,
    cpus_per_client: Annotated[float, typer.Option("--cpus-per-client", help="Ray CPUs per virtual "
                                                   "node (fractions allowed): how many run at once")] = 1.0,
    gpus_per_client: Annotated[float, typer.Option("--gpus-per-client", help="Ray GPUs per virtual "
                                                   "node, e.g. 0.25: four share one GPU")] = 0.0,
    ray_address: Annotated[str | None, typer.Option("--ray-address", help="join a running Ray cluster "
                                                    "(auto, or HEAD_IP:6379) instead of a private Ray")] = None,
    ray_cpus: Annotated[float | None, typer.Option("--ray-cpus", help="CPUs of the private Ray "
                                                   "(default: all of this machine's)")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="continue the unfinished run in --out "
                                         "from its last checkpoint")] = False,
) -> None:
    """Run CONFIG on Flower's simulation runtime with N virtual SuperNodes as Ray actors.

    Needs `pip install 'fedblend[simulation]'`; writes the same run directory as `fedblend run`.
    """
    from fedblend.config import load_config
    from fedblend.console import print_summary, user_errors
    from fedblend.deploy.local import check_resume
    from fedblend.deploy.sim import deploy_sim
    from fedblend.signals import sigterm_interrupts

    with user_errors():
        cfg = load_config(config, set_ or [])
        out_dir = out or Path("runs") / cfg.name
        if note := check_resume(out_dir.resolve(), resume):
            typer.echo(note, err=True)
        try:
            with sigterm_interrupts():
                summary, res = deploy_sim(config, nodes, set_ or [], out_dir, cpus_per_client=cpus_per_client,
                                          gpus_per_client=gpus_per_client, ray_address=ray_address,
                                          ray_cpus=ray_cpus, resume=resume)
        except KeyboardInterrupt as e:  # the run's status.json says "interrupted"
            import sys

            from fedblend.signals import Interrupted, record_interrupt

            sig = "SIGTERM" if isinstance(e, Interrupted) else "SIGINT"
            typer.echo(record_interrupt(out_dir, sys.argv[1:], sig) or f"interrupted ({sig})", err=True)
            raise typer.Exit(code=143 if isinstance(e, Interrupted) else 130) from None
    print_summary(summary, out_dir)
    typer.echo(f"node state and local adapters: {res.work / 'nodes'}; Ray and Flower logs: {res.work / 'logs'}")


@deploy_app.command("certs")
def certs(
    out: Annotated[Path, typer.Argument(help="directory for the CA, server cert and node keys")],
    nodes: Annotated[int, typer.Option("--nodes", min=1, help="node key pairs to make")] = 2,
) -> None:
    """Generate a self-signed development CA, a SuperLink certificate and SuperNode keys."""
    from fedblend.deploy.certs import make_certs

    c = make_certs(out, nodes=nodes)
    typer.echo(f"CA {c.ca}; server {c.server_cert} {c.server_key}; node keys {c.dir}/node_<i>[.pub]")
