"""The seam between algorithms (the maths) and engines (the loop, transport, state).

An algorithm is a small object with pure hooks. Engines call them in this order:

1. ``init_server_state(trainer)`` once, on the server;
   ``init_client_state(trainer, cid)`` once per client, on the client.
2. Each round: ``configure_round`` (server: one payload per selected client) ->
   ``local_update`` (client: returns an update and its new private state) ->
   ``aggregate`` (server: new server state from the decoded updates; its mean goes through
   ``server_update``, the FedAvgM step of ``train.server_lr`` / ``train.server_momentum``).
3. After the last round: ``final_payload`` (server -> every client), then
   ``finish_client`` (client; e.g. FedDPA-F's local fine-tuning), then evaluation on the
   client with ``eval_adapters`` and ``eval_mix``.

Payloads and updates are :class:`~fedblend.comm.codec.Message` objects. Only the roles in
``shared_roles`` may appear in an update: the engine refuses anything else, so private
(local) adapters cannot leave a client. States are ``{role: {name: tensor}}`` dicts, which
engines checkpoint as safetensors.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from fedblend.aggregation.fedavg import weighted_mean
from fedblend.comm.codec import BASE_DELTA, Message, State, Tensors
from fedblend.config import ExperimentConfig

MOMENTUM = "server_momentum."  # server-state key prefix of a role's momentum buffer (never sent)


def server_step(old: Tensors, avg: Tensors, momentum: Tensors | None, lr: float, beta: float,
                plain: frozenset[str] = frozenset()) -> tuple[Tensors, Tensors | None]:
    """FedAvgM (Hsu et al. 2019): ``d = avg - old``, ``m = beta m + d``, ``new = old + lr m``.
    Tensors named in ``plain`` (statistics, not weights) and new tensors take ``avg`` as is."""
    new, mom = {}, {} if beta > 0 else None
    for k, w in avg.items():
        if k in plain or k not in old:
            new[k] = w
            continue
        d = w - old[k]
        if mom is not None:
            d = beta * momentum[k] + d if momentum is not None and k in momentum else d
            mom[k] = d
        new[k] = old[k] + lr * d
    return new, mom


@dataclass
class ClientContext:
    """What a client-side hook may use: its own data, the shared trainer, a seed."""

    cid: int
    round: int
    seed: int
    examples: Sequence[Any]
    trainer: Any
    cfg: ExperimentConfig
    progress: Callable[[int], None] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def client_seed(seed: int, rnd: int, cid: int) -> int:
    """A per-(round, client) seed, so a resumed or distributed run draws the same numbers."""
    return (seed * 1_000_003 + (rnd + 1) * 7_919 + (cid + 1) * 104_729) % (2**31 - 1)


class Algorithm(ABC):
    """One federated method. Its class declares what the registry (:mod:`fedblend.algorithms`)
    and the config need: ``name``, ``modality``, ``shared_roles``, its own settings section
    (``section`` + a pydantic ``Settings`` model, read as ``self.settings``), and in
    :meth:`check` the combinations of shared settings it refuses."""

    name: str = "?"
    modality: str = "text"  # "text" | "vision": which modality runs it
    paper: str = ""  # one line for the README's methods table
    section: str | None = None  # its own config section, e.g. "feddpa" for [feddpa]
    Settings: type | None = None  # the pydantic model of that section (fedblend.config.Section)
    shared_roles: tuple[str, ...] = ("global",)
    pools_data: bool = False  # True: train one model on the pooled data (centralized)
    plain_average_keys: frozenset[str] = frozenset()  # tensors the server step leaves averaged
    mean_aggregation: bool = True  # aggregate() is the weighted mean of the shared roles: robust
    # rules, update clipping and DP (which replace that mean) compose with it; False refuses them
    equal_ranks: bool = True  # False: takes lora.client_ranks / lora.rank_tiers

    def __init__(self, cfg: ExperimentConfig) -> None:
        self.cfg = cfg

    @classmethod
    def check(cls, cfg: ExperimentConfig) -> None:
        """Refuse settings this method cannot run with: raise ``ValueError("section.key: why")``
        (the config loader reports it as one line). Called at config load time."""
        if cls.equal_ranks and cfg.lora.heterogeneous:
            key = "lora.client_ranks" if cfg.lora.client_ranks else "lora.rank_tiers"
            raise ValueError(f"{key}: {cls.name} needs every client at one rank (lora.r); "
                             "heterogeneous ranks run with flora, flexlora or hetlora")
        if cfg.lora.dora and cls.modality != "text":
            raise ValueError(f"lora.dora: {cls.name} trains no LoRA adapter (DoRA is an option of the text methods)")
        if not cls.mean_aggregation:
            for key, on in (("aggregate.rule", cfg.aggregate.rule != "fedavg"),
                            ("aggregate.clip_norm", cfg.aggregate.clip_norm > 0),
                            ("privacy.clip", cfg.privacy.clip > 0)):
                if on:
                    raise ValueError(f"{key}: {cls.name}'s aggregation is not a mean of the clients' "
                                     "tensors; robust rules, update clipping and DP do not compose with it")

    @classmethod
    def label(cls, cfg: ExperimentConfig) -> str:
        """The method's name in comparison tables (variants add their settings)."""
        return cls.name

    def summary_fields(self) -> dict[str, Any]:
        """Method-specific fields of summary.json."""
        return {"weighting": None}

    @property
    def settings(self) -> Any:
        """This method's own settings section (``[<section>]``), validated, defaults filled."""
        return self.cfg.section(self.section) if self.section else None

    # ---- state ----------------------------------------------------------------------------
    def init_server_state(self, trainer) -> State:
        return {"global": trainer.adapters.fresh("global", self.cfg.seed)}

    def init_client_state(self, trainer, cid: int) -> State:
        return {}

    # ---- one round --------------------------------------------------------------------------
    def configure_round(self, rnd: int, server_state: State, client_ids: Sequence[int]) -> dict[int, Message]:
        payload = {role: server_state[role] for role in self.shared_roles if role in server_state}
        return {cid: Message(tensors=payload, config={"round": rnd}) for cid in client_ids}

    @abstractmethod
    def local_update(self, ctx: ClientContext, payload: Message, state: State) -> tuple[Message, State]:
        ...

    def aggregate(self, rnd: int, updates: dict[int, Message], server_state: State) -> State:
        """FedAvg of every shared role, weighted by example count, then :meth:`server_update`."""
        new = dict(server_state)
        for role in self.shared_roles:
            items = [(u.tensors[role], float(u.num_examples)) for u in updates.values() if role in u.tensors]
            if items:
                new[role] = weighted_mean(items)
        return self.server_update(new, server_state)

    def expected_update(self, cid: int, server_state: State, update: Message) -> State:
        """What an update from client ``cid`` is screened against (tensor names, shapes, dtypes;
        ``aggregate.max_update_norm``) and decompressed onto: the server's state by default.
        Methods whose clients send other shapes (heterogeneous ranks) return what that client
        was sent; ``update`` (as received, maybe compressed) only selects among shapes the
        server allows, a wrong shape is still rejected with its reason."""
        return server_state

    def server_update(self, new: State, server_state: State) -> State:
        """The server optimizer on the aggregate ``new`` of the round that started from
        ``server_state``: with ``train.server_lr`` / ``train.server_momentum`` the FedAvgM step
        on every shared role's delta (its momentum buffer stays in the server state, under
        :data:`MOMENTUM` + role); at the defaults (1, 0) ``new`` unchanged. Every aggregation
        path (FedAvg here, the robust rules and DP in the trust wrapper) ends here."""
        tc = self.cfg.train
        if tc.server_lr == 1.0 and tc.server_momentum == 0.0:
            return new
        out = dict(new)
        for role in self.shared_roles:
            if role in new and role in server_state and new[role] is not server_state[role]:
                key = MOMENTUM + role
                out[role], mom = server_step(server_state[role], new[role], server_state.get(key),
                                             tc.server_lr, tc.server_momentum, self.plain_average_keys)
                if mom is not None:
                    out[key] = mom
        return out

    # ---- after training -------------------------------------------------------------------
    def final_payload(self, server_state: State) -> Message:
        return Message(tensors={r: server_state[r] for r in self.shared_roles if r in server_state})

    def finish_client(self, ctx: ClientContext, final: Message, state: State) -> State:
        return state

    def finish_steps(self, n_examples: int, trainer) -> int:
        """Optimizer steps ``finish_client`` takes (for progress bars)."""
        return 0

    def update_steps(self, n_examples: int, rnd: int, trainer) -> int:
        """Optimizer steps one ``local_update`` takes (for progress bars)."""
        return trainer.train_steps(n_examples, self.cfg.train.local_epochs)

    @abstractmethod
    def eval_adapters(self, final: Message, state: State) -> State:
        """The adapters a client's model uses at inference, by role."""

    def eval_mix(self, ctx: ClientContext, instructions: Sequence[str]) -> tuple[dict[str, Any], torch.Tensor | None]:
        """Per-role mixing weights for these test inputs (float or one per instance), and the
        per-instance weights to record (None when the weighting is not instance-wise)."""
        roles = sorted(self.eval_adapters_roles())
        return {r: 1.0 for r in roles}, None

    def global_base_delta(self, server_state: State) -> Tensors | None:
        """The base-weight delta every client's model holds after the final payload, for the
        server to export (FLoRA, FedEx-LoRA); None: the method leaves the base weights alone."""
        return None

    def eval_adapters_roles(self) -> tuple[str, ...]:
        return ("global",)

    def eval_embeddings(self, ctx: ClientContext, instructions: Sequence[str]) -> tuple[dict[str, float], list[str]] | None:
        """What ``eval_mix`` embeds for these inputs with the client's own adapters loaded: the
        mixing and the texts (None: it embeds nothing). Cross-client evaluation embeds them for
        every client in shared batches first, and ``eval_mix`` then reuses the rows."""
        return None


def load_into(trainer, adapters: State) -> None:
    for role, tensors in adapters.items():
        if role == BASE_DELTA:  # the frozen weights' increment (FLoRA, FedEx-LoRA): W = W0 + delta
            trainer.adapters.set_base_delta(tensors)
        else:
            trainer.adapters.set(role, tensors)
