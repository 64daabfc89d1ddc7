"""Typed, validated experiment configuration.

A config is a TOML file (see ``configs/``) loaded into :class:`ExperimentConfig`. Every
section forbids unknown keys, so a typo fails at load time. ``--set section.key=value``
overrides are applied before validation; values are parsed as TOML literals
(``3``, ``1e-3``, ``true``, ``["q_proj", "v_proj"]``) and fall back to plain strings.
Every problem is reported as one line that names the offending key.
"""

from __future__ import annotations

import copy
import re
import tomllib
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fedblend.errors import ConfigError

CORRUPTIONS = ("none", "blur", "noise", "contrast", "grayscale", "rotation")


class Section(BaseModel):
    """A config section: unknown keys fail at load time. An algorithm's own settings
    (``[feddpa]``, ``[tripleplay]``, ...) subclass it in the algorithm's module."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    # keys that change inference only: `fedblend evaluate` / `sweep` may change them on a
    # trained run (every eval.* key is such a key; an algorithm section names its own here)
    inference_only: ClassVar[frozenset[str]] = frozenset()


_Section = Section


class ModelConfig(_Section):
    """The frozen text backbone."""

    source: Literal["smollm2", "tiny", "path"] = "smollm2"
    path: str = ""
    max_length: int = Field(256, ge=16, description="truncate prompt+response to this many tokens")
    tiny_hidden_size: int = Field(64, ge=8)
    tiny_layers: int = Field(2, ge=1)
    tiny_heads: int = Field(4, ge=1)
    device: str = Field(
        "auto",
        description="auto (CUDA when available, else CPU) | cpu | cuda | cuda:N; the vision path too",
    )
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = Field(
        "float32", description="frozen backbone weights and compute precision (autocast); adapters and "
        "optimizer state stay float32; auto = bfloat16 on a CPU with AMX or a CUDA device with "
        "bfloat16, float32 elsewhere (summary.json's system block says which)",
    )
    quantization: Literal["none", "int8", "nf4"] = Field(
        "none", description="text backbone weights: int8 (LLM.int8) or 4-bit NF4 with double "
        "quantization (QLoRA), both bitsandbytes",
    )
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="NF4 layers' compute dtype; auto = model.dtype",
    )

    @model_validator(mode="after")
    def _path_needed(self) -> ModelConfig:
        if self.source == "path" and not self.path:
            raise ValueError("model.path: required when model.source = 'path'")
        from fedblend.device import check_device

        check_device(self)  # cuda asked for where there is none, float16 on the CPU
        return self

    @field_validator("device")
    @classmethod
    def _device_name(cls, v: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda|cuda:\d+", v):
            raise ValueError(f"expected auto, cpu, cuda or cuda:N, got {v!r}")
        return v


class LoraConfig(_Section):
    r: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"], min_length=1)
    dora: bool = Field(
        False, description="DoRA (PEFT use_dora): each adapted layer also trains a magnitude vector, "
        "shared or kept local as the algorithm does with the LoRA factors",
    )
    # heterogeneous ranks (FLoRA, FlexLoRA, HetLoRA): a property of the federation
    client_ranks: list[int] = Field(
        default_factory=list, description="one LoRA rank per client (in data.clients order, else client "
        "id order); empty = every client at lora.r. lora.r is then the largest (the server's rank)",
    )
    rank_tiers: list[int] = Field(
        default_factory=list, description="resource tiers: each client gets one of these ranks, drawn "
        "uniformly with the experiment's seed (instead of lora.client_ranks)",
    )
    hetero_scaling: Literal["constant", "alpha"] = Field(
        "constant", description="scaling s_i of a client at rank r_i: constant = lora.alpha / lora.r for "
        "every rank (alpha_i = s r_i, as FLoRA's code), alpha = lora.alpha / r_i (FlexLoRA's code)",
    )

    @field_validator("client_ranks", "rank_tiers")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if any(r < 1 for r in v):
            raise ValueError("every rank must be >= 1")
        return v

    @model_validator(mode="after")
    def _ranks(self) -> LoraConfig:
        ranks = self.client_ranks or self.rank_tiers
        if self.client_ranks and self.rank_tiers:
            raise ValueError("lora.rank_tiers: give lora.client_ranks or lora.rank_tiers, not both")
        if ranks:
            top = max(ranks)
            if "r" in self.model_fields_set and self.r != top:
                raise ValueError(f"lora.r: must be the largest client rank ({top}) when ranks differ")
            if self.r != top:
                self.r = top
        return self

    @property
    def heterogeneous(self) -> bool:
        return bool(self.client_ranks or self.rank_tiers)

    def scaling_for(self, rank: int) -> float:
        """s_i of a client at ``rank`` (see ``hetero_scaling``)."""
        if self.hetero_scaling == "constant":
            return self.alpha / self.r
        return self.alpha / rank


class DataConfig(_Section):
    kind: Literal["instructions", "tsv", "synthetic"] = "instructions"
    dir: str = "../shared/data/flan8"
    layout: Literal["file_per_client", "task_per_client", "label_skew"] = "file_per_client"
    train_pattern: str = "local_training_{client}.json"
    train_file: str = "train.jsonl"
    test_file: str = "test.jsonl"
    num_clients: int = Field(8, ge=1)
    clients: list[int] = Field(default_factory=list, description="subset of client ids; empty = all")
    max_train_per_client: int = Field(0, ge=0, description="0 = all")
    test_fraction: float = Field(0.2, gt=0, lt=1, description="for sources without a test file")
    # label-skew partitioning of one pool (flwr-datasets partitioners)
    partitioner: Literal["iid", "dirichlet", "pathological"] = "iid"
    dirichlet_alpha: float = Field(0.5, gt=0)
    classes_per_client: int = Field(2, ge=1)
    # TSV text classification
    text_column: str = "sentence"
    label_column: str = "label"
    has_header: bool = True
    label_names: list[str] = Field(default_factory=list)
    instruction_template: str = "{text}"
    # built-in synthetic generator (used when no data dir exists)
    synthetic_train_per_client: int = Field(64, ge=4)
    synthetic_test_per_task: int = Field(32, ge=2)

    @field_validator("train_pattern")
    @classmethod
    def _pattern_has_client(cls, v: str) -> str:
        if "{client}" not in v:
            raise ValueError("must contain '{client}'")
        return v


class TrainConfig(_Section):
    rounds: int = Field(20, ge=1)
    local_epochs: float = Field(10, gt=0)
    lr: float = Field(3e-4, gt=0)
    batch_size: int = Field(64, ge=1)
    micro_batch_size: int = Field(8, ge=1)
    weight_decay: float = Field(0.0, ge=0)
    scheduler: Literal["linear", "constant"] = "linear"
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    max_grad_norm: float = Field(1.0, ge=0)
    clients_per_round: int = Field(0, ge=0, description="0 = every client every round")
    min_clients: int = Field(1, ge=1, description="fewer valid updates than this: the round is skipped")
    group_by_length: bool = Field(
        True, description="sort each batch's examples by length before splitting it into micro-batches "
        "(same gradient, less padding)"
    )
    gradient_checkpointing: bool = Field(
        False, description="recompute the frozen backbone's activations in the backward pass "
        "(non-reentrant): less memory, more time"
    )
    # server optimizer on the aggregated update (FedAvgM, Hsu et al. 2019): every algorithm with
    # shared roles applies it to them, after FedAvg or the robust rule / DP of [aggregate]
    server_lr: float = Field(1.0, gt=0, le=10, description="server step on the averaged client delta")
    server_momentum: float = Field(
        0.0, ge=0, lt=1, description="FedAvgM server momentum on the averaged delta; 0 = plain FedAvg"
    )


class EvalConfig(_Section):
    max_per_task: int = Field(0, ge=0, description="0 = whole test set")
    max_new_tokens: int = Field(32, ge=1)
    batch_size: int = Field(16, ge=1)
    metric: Literal["rougeL", "rouge1", "rouge2", "exact_match"] = "rougeL"
    ttp: bool = True
    dedupe: bool = Field(
        True, description="generate once for client models that are identical (same adapters, fixed mixing)"
    )
    cross_client_batch: bool = Field(
        True, description="generate for all clients' models in shared batches (each row its own "
        "client's LoRA tensors and mixing weights) instead of client after client",
    )
    # evaluation at population scale (text): see docs/population.md
    exact_max_clients: int = Field(
        100, ge=0, description="federations with at most this many clients are evaluated exactly (every "
        "client, every task); larger ones on a seeded sample of this many clients (eval.clients); 0 = always exact",
    )
    clients: int = Field(
        0, ge=0, description="evaluate a seeded sample of this many clients, with 95% intervals; "
        "0 = every client up to eval.exact_max_clients, else a sample of that many",
    )
    ttp_tasks: int = Field(
        20, ge=1, description="sampled evaluation: TTP of each evaluated client on a seeded sample of this "
        "many other clients' tasks (besides its own)",
    )
    every: int = Field(
        0, ge=0, description="every this many rounds, score the global adapter's P on the evaluated clients' "
        "own test sets (eval/p_per_round.json, plotted in the report); 0 = off",
    )
    pooled_test: int = Field(
        256, ge=0, description="sampled evaluation of a label-skew federation: TTP on one seeded pooled test "
        "set of this many instances drawn over all clients' test sets; 0 = sample tasks (eval.ttp_tasks)",
    )


class VisionConfig(_Section):
    """The vision path (TriplePlay / FedCLIP and baselines); see docs/vision.md."""

    # backbone
    backbone: Literal["clip", "tiny_clip", "efficientnet_lite0", "module"] = "efficientnet_lite0"
    path: str = Field("", description="CLIP checkpoint dir (clip, tiny_clip) or 'pkg.mod:factory' (module)")
    image_size: int = Field(224, ge=16, description="images are resized to this square size")
    mean: list[float] = Field(default_factory=lambda: [0.5, 0.5, 0.5], min_length=3, max_length=3)
    std: list[float] = Field(default_factory=lambda: [0.5, 0.5, 0.5], min_length=3, max_length=3)
    nf4: bool = Field(False, description="load the frozen backbone in 4-bit NF4 (bitsandbytes)")
    double_quant: bool = Field(True, description="NF4 double quantization of the block scales")
    prompt_template: str = "a picture of a {class_name}"
    class_names: list[str] = Field(default_factory=list, description="empty = the data set's names")
    # trainable parts
    adapter: Literal["attention", "residual", "none"] = "attention"
    adapter_ratio: float = Field(0.2, gt=0, le=1, description="residual adapter mix alpha")
    adapter_reduction: int = Field(4, ge=1, description="residual bottleneck width = dim / reduction")
    head: Literal["auto", "text", "cosine", "linear"] = "auto"
    feature_norm: Literal["l2", "standardize"] = Field(
        "l2", description="standardize: centre/scale unit-norm features per dimension before the "
        "adapter, statistics measured by each client and averaged with the adapter",
    )
    logit_scale: float = Field(0.0, ge=0, description="0 = the CLIP checkpoint's (or 30 without one)")
    loss: Literal["auto", "contrastive", "ce"] = Field(
        "auto", description="auto: CLIP contrastive with a text head, cross-entropy otherwise"
    )
    lora: bool = Field(False, description="LoRA in the backbone attention (QLoRA when nf4)")
    personal: bool = Field(False, description="also keep a private local adapter (FedDPA-style)")
    personal_weight: float = Field(
        0.5, ge=0, le=1, description="vision.personal: the local adapter's weight at inference (global 1 - w)"
    )
    train_head: bool = Field(
        True, description="false: the head (prototypes / linear) stays at its shared seeded init and "
        "only the adapter trains (FedBABU-style)",
    )
    # long tail
    balanced_loss: bool = Field(False, description="balanced-softmax loss from client class counts")
    # data and federation
    dataset: Literal["cifar10", "parquet", "synthetic"] = Field(
        "cifar10", description="parquet: any vision.dir with train/test.parquet (image, label); "
        "cifar10: the same, CIFAR-10's class names unless the data or class_names say otherwise",
    )
    dir: str = Field("../shared/data/cifar10", description="holds train.parquet and test.parquet")
    federation: Literal["label_skew", "domain"] = "label_skew"
    imbalance_factor: float = Field(1.0, ge=1, description="CIFAR-LT: class c keeps n_max*IF^(-c/(C-1))")
    n_max: int = Field(0, ge=0, description="LT head class size; 0 = the largest class")
    test_per_class: int = Field(0, ge=0, description="global balanced test set size per class; 0 = all")
    own_test_size: int = Field(200, ge=1, description="per-client test split size")
    domains: list[str] = Field(
        default_factory=lambda: ["none", "blur", "noise", "contrast", "grayscale", "rotation"],
        min_length=2,
    )
    unseen_domain: str = Field("rotation", description="held out of training (domain federation)")
    synthetic_per_class: int = Field(24, ge=2)
    # system
    cache_dir: str = Field(".fedblend_cache", description="frozen-feature cache; '' = off")
    feature_batch_size: int = Field(64, ge=1)
    target_accuracy: float = Field(0.5, gt=0, le=1, description="for rounds_to_target")
    reference: bool = Field(True, description="centralized linear probe + adapter reference rows "
                            "(accuracy.reference; computed only with the feature cache)")
    reference_epochs: int = Field(10, ge=1, description="epochs of the centralized reference adapter")

    @field_validator("prompt_template")
    @classmethod
    def _template(cls, v: str) -> str:
        if "{class_name}" not in v:
            raise ValueError("must contain '{class_name}'")
        return v

    @model_validator(mode="after")
    def _checks(self) -> VisionConfig:
        if self.backbone in ("clip", "module") and not self.path:
            raise ValueError(f"vision.path: required when vision.backbone = {self.backbone!r}")
        for d in self.domains:
            if d not in CORRUPTIONS:
                raise ValueError(f"vision.domains: unknown corruption {d!r}; choose from {', '.join(CORRUPTIONS)}")
        if self.federation == "domain" and self.unseen_domain not in self.domains:
            raise ValueError("vision.unseen_domain: must be one of vision.domains")
        return self


class EngineConfig(_Section):
    threads: int = Field(0, ge=0, description="torch threads; 0 = torch default")
    checkpoint_every: int = Field(1, ge=0, description="rounds between resumable checkpoints; 0 = never")
    round_timeout: float = Field(
        0.0, ge=0, description="Flower: seconds to wait for a round's updates; clients not answered by then "
        "are left out of the round (0 = the run-config's message-timeout-s)"
    )
    progress: bool = True


class FaultsConfig(_Section):
    """Seeded fault injection (in-process engine), for testing and research."""

    drop_prob: float = Field(0.0, ge=0, lt=1, description="chance a sampled client fails its update")


class AggregateConfig(_Section):
    """How the server screens and combines updates (see fedblend.aggregation.robust)."""

    rule: Literal["fedavg", "median", "trimmed_mean", "krum", "multi_krum"] = "fedavg"
    trim_ratio: float = Field(0.2, ge=0, lt=0.5, description="trimmed_mean: cut this share at each end")
    krum_f: int = Field(1, ge=0, description="krum / multi_krum: assumed number of hostile clients")
    clip_norm: float = Field(0.0, ge=0, description="clip each update's delta to this L2 norm; 0 = off")
    max_update_norm: float = Field(0.0, ge=0, description="reject updates whose delta norm exceeds this; 0 = off")


class AttackConfig(_Section):
    """Simulated hostile clients (applied to their update delta, client side)."""

    kind: Literal["none", "sign_flip", "scale", "gaussian"] = "none"
    clients: list[int] = Field(default_factory=list, description="ids of the hostile clients")
    scale: float = Field(10.0, gt=0, description="sign_flip/scale factor; gaussian noise std")


class PrivacyConfig(_Section):
    """Client-level DP: clip each delta on the client, Gaussian noise on the server's mean."""

    clip: float = Field(0.0, ge=0, description="L2 clip of each client's delta; 0 = DP off")
    noise_multiplier: float = Field(0.0, ge=0, description="noise std = noise_multiplier * clip / sampled")
    delta: float = Field(1e-5, gt=0, lt=1, description="target delta of the (epsilon, delta) guarantee")


class CommConfig(_Section):
    compress: Literal["none", "fp16", "int8", "nf4"] = Field(
        "none", description="upload compression of update deltas (blockwise, error feedback)"
    )


class ExperimentConfig(Section):
    """The whole experiment: the shared sections below, plus the algorithm's own section
    (``[feddpa]``, ``[hetlora]``, ...), declared by the algorithm's module and validated
    through the registry (:mod:`fedblend.algorithms`). A config may carry the sections of
    other algorithms too (one file for a comparison); each is validated against its schema."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)

    name: str = "experiment"
    algorithm: str = "fedit"
    seed: int = 42
    model: ModelConfig = Field(default_factory=ModelConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    vision: VisionConfig = Field(default_factory=VisionConfig)
    faults: FaultsConfig = Field(default_factory=FaultsConfig)
    aggregate: AggregateConfig = Field(default_factory=AggregateConfig)
    attack: AttackConfig = Field(default_factory=AttackConfig)
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)
    comm: CommConfig = Field(default_factory=CommConfig)

    @field_validator("algorithm")
    @classmethod
    def _known_algorithm(cls, v: str) -> str:
        known = _registry().names()
        if v not in known:
            raise ValueError(f"unknown algorithm {v!r}; choose one of {', '.join(known)}")
        return v

    @model_validator(mode="after")
    def _algorithm_sections(self) -> ExperimentConfig:
        """Every extra top-level table must be an algorithm's settings section; the chosen
        algorithm's is filled with its defaults when absent, then the algorithm's ``check``."""
        registry = _registry()
        algo = registry.algorithm_class(self.algorithm)
        extra = self.__pydantic_extra__ if self.__pydantic_extra__ is not None else {}
        schemas = registry.sections() if set(extra) - {algo.section} else {algo.section: algo.Settings}
        for key, raw in list(extra.items()):
            schema = schemas.get(key)
            if schema is None:
                raise ValueError(f"{key}: unknown key")
            if isinstance(raw, schema):
                continue
            if not isinstance(raw, dict):
                raise ValueError(f"{key}: expected a section ([{key}])")  # noqa: TRY004 (pydantic reports ValueError)
            try:
                extra[key] = schema.model_validate(raw)
            except ValidationError as e:
                first = e.errors()[0]
                where = ".".join(str(p) for p in first["loc"])
                msg = "unknown key" if first["type"] == "extra_forbidden" else first["msg"]
                raise ValueError(f"{key}.{where}: {msg.removeprefix('Value error, ')}") from None
        if algo.section and algo.section not in extra:
            extra[algo.section] = algo.Settings()
        algo.check(self)
        return self

    def section(self, name: str) -> Any:
        """The settings section ``[name]`` of an algorithm: as given, else its defaults."""
        extra = self.__pydantic_extra__ or {}
        if name in extra:
            return extra[name]
        schema = _registry().sections().get(name)
        if schema is None:
            raise KeyError(f"no algorithm declares a settings section [{name}]")
        return schema()

    @property
    def modality(self) -> str:
        """``"text"`` or ``"vision"``: the modality of the algorithm (its class declares it)."""
        return _registry().algorithm_class(self.algorithm).modality

    @model_validator(mode="after")
    def _sizes(self) -> ExperimentConfig:
        """Sizes that cannot fit the federation (its client count, as the config gives it)."""
        if self.modality == "vision":
            return self
        n = len(self.data.clients) or self.data.num_clients
        where = "data.clients" if self.data.clients else "data.num_clients"
        k = self.train.clients_per_round
        if k > n:
            raise ValueError(f"train.clients_per_round: {k} clients per round > {n} clients ({where})")
        if self.eval.clients > n:
            raise ValueError(f"eval.clients: an evaluation sample of {self.eval.clients} > {n} clients ({where})")
        if self.lora.client_ranks and len(self.lora.client_ranks) != n:
            raise ValueError(f"lora.client_ranks: {len(self.lora.client_ranks)} ranks for {n} clients ({where})")
        return self

    def client_rank(self, cid: int) -> int:
        """Client ``cid``'s LoRA rank: ``lora.client_ranks`` (by the client's position in
        ``data.clients``, else its id), a seeded draw from ``lora.rank_tiers``, else ``lora.r``."""
        lc = self.lora
        if lc.client_ranks:
            pos = self.data.clients.index(cid) if self.data.clients else cid
            return lc.client_ranks[pos]
        if lc.rank_tiers:
            import random

            return random.Random(self.seed * 1_000_003 + cid).choice(lc.rank_tiers)
        return lc.r

    @model_validator(mode="after")
    def _trust_checks(self) -> ExperimentConfig:
        if self.privacy.noise_multiplier > 0 and self.privacy.clip <= 0:
            raise ValueError("privacy.clip: must be > 0 when privacy.noise_multiplier > 0")
        if self.privacy.clip > 0 and self.aggregate.rule != "fedavg":
            raise ValueError("aggregate.rule: client-level DP needs 'fedavg' (its noise is calibrated to a mean)")
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def is_inference_setting(key: str) -> bool:
    """Whether ``section.key`` changes inference only (re-evaluation and sweeps may set it)."""
    section, _, name = key.partition(".")
    if section == "eval":
        return True
    schema = _registry().sections().get(section)
    return schema is not None and name in schema.inference_only


def _registry() -> Any:
    """The algorithm registry. It sits above this module (the algorithms import the config), so
    it is looked up at run time, as a plugin would be: the layering holds for imports."""
    import importlib

    return importlib.import_module("fedblend.algorithms")


def _format_validation_error(err: ValidationError, source: str, overrides: list[str] | None = None) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"] if p != "__root__")
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    msg = msg.removeprefix("Value error, ")
    if (not loc or msg.startswith(f"{loc}.")) and ":" in msg:  # a check naming its own key
        named = msg.split(":", 1)[0]
        if named and " " not in named:
            loc, msg = named, msg if loc else msg.split(":", 1)[1].strip()
    # a key given with --set is reported against that override, not the config file
    keys = [(o, o.split("=", 1)[0].strip()) for o in overrides or []]
    unknown_section = first["type"] == "extra_forbidden" or msg == "unknown key"
    given = [o for o, k in keys if loc and (k == loc or (unknown_section and k.startswith(f"{loc}.")))]
    if given:
        return f"--set {given[-1]}: {msg.removeprefix(f'{loc}: ')}"
    if msg.startswith(f"{loc}:"):
        return f"{source}: {msg}"
    return f"{source}: {loc}: {msg}" if loc else f"{source}: {msg}"


def parse_override(item: str) -> tuple[list[str], Any]:
    """Parse ``section.key=value``; the value is read as a TOML literal or else a string."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected section.key=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {item!r}: empty key")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.split("."), value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    data = copy.deepcopy(raw)
    for item in overrides:
        path, value = parse_override(item)
        node = data
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: {part} is not a section")
            node = child
        node[path[-1]] = value
    return data


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Load and validate a config file (or the defaults when ``path`` is None)."""
    raw: dict[str, Any] = {}
    source = "config"
    if path is not None:
        p = Path(path)
        source = str(p)
        if not p.is_file():
            raise ConfigError(f"{p}: config file not found")
        try:
            raw = tomllib.loads(p.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{p}: invalid TOML: {e}") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{p}: cannot read config: {e}") from None
    return config_from_dict(raw, overrides or [], source=source)


REMOVED_KEYS: dict[str, str] = {
    "engine.kind": "removed: the command picks the engine (`fedblend run` in-process, "
    "`fedblend deploy` on Flower)",
    "train.local_weight": "moved: FedDPA-T's local-phase mix is feddpa.local_weight; the vision "
    "path's inference mix of vision.personal is vision.personal_weight",
    **{f"train.{k}": f"moved to feddpa.{k}" for k in ("finetune_epochs", "local_phase_epochs", "global_phase_mix")},
    **{f"eval.{k}": f"moved to feddpa.{k}" for k in (
        "weighting", "weighting_convention", "static_weight", "dynamic_lambda", "dynamic_top_k", "dynamic_reference")},
    "train.prox_mu": "moved to fedprox.mu (the fedprox algorithm's section)",
    **{f"vision.{k}": f"moved to tripleplay.{k.removeprefix('gan_')}" for k in (
        "gan_noise_dim", "gan_hidden", "gan_steps", "gan_lr", "gan_warmup_rounds", "gan_target")},
    "vision.gan": "moved to tripleplay.gan",
}
"""Keys that are gone or moved, each with the one line that says where (checked before the
schema, so an old config fails with that line rather than 'unknown key')."""


def _check_removed(data: dict[str, Any], source: str, overrides: list[str]) -> None:
    for key, why in REMOVED_KEYS.items():
        node: Any = data
        for part in key.split("."):
            node = node.get(part, _MISSING) if isinstance(node, dict) else _MISSING
        if node is _MISSING:
            continue
        given = [o for o in overrides if o.split("=", 1)[0].strip() == key]
        raise ConfigError(f"--set {given[-1]}: {why}" if given else f"{source}: {key}: {why}")


_MISSING = object()


def config_from_dict(
    raw: dict[str, Any], overrides: list[str] | None = None, source: str = "config"
) -> ExperimentConfig:
    data = apply_overrides(raw, overrides or [])
    _check_removed(data, source, overrides or [])
    try:
        return ExperimentConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, source, overrides)) from None


def resolve_data_dir(cfg: ExperimentConfig) -> Path | None:
    """The data directory as an absolute path (relative paths are from the working dir)."""
    if cfg.data.kind == "synthetic":
        return None
    p = Path(cfg.data.dir).expanduser()
    if not p.is_absolute():
        p = (Path.cwd() / p).resolve()
    if not p.is_dir():
        raise ConfigError(f"data.dir: directory not found: {cfg.data.dir}")
    return p
