"""Named LoRA adapters on one frozen backbone, with per-layer and per-instance mixing.

Built on Hugging Face PEFT: a ``global`` and a ``local`` adapter (both plain PEFT LoRA
adapters) live side by side in every target layer. Each layer computes

    h = W0 x + s * (w_g * B_g A_g x + w_l * B_l A_l x)

PEFT's LoRA forward multiplies each active adapter's output by ``scaling[name]``; the
:meth:`DualLoRA.mixing` context sets that scaling to ``s * w`` (PEFT's ``set_scale``) where ``w``
is a float or a per-instance tensor shaped ``(batch, 1, 1)`` (it broadcasts over tokens and
features), and activates the roles that take part (PEFT's ``set_adapter``).
That is the whole extension: outside the context PEFT behaves as usual. A role weighted by
the number 0 that is not being trained is also left out of the layers' active adapters
there, so FedIT's unused ``local`` adapter costs nothing.

DoRA (``lora.dora``, PEFT ``use_dora``): each role also holds a magnitude vector m (one number
per output row, key ``...lora_magnitude_vector.weight``), one more tensor among the role's
tensors. One role at weight w computes ``h = c (W0 + s w B A) x``, ``c = m / ||W0 + s w B A||``
(row norms, detached): w sits inside the normalisation. Several roles run in turn (global,
then local), each mapping the output so far ``h`` to ``c_k (h + s w_k B_k A_k x)``: in eval,
or in training without dropout, ``h = c_l (c_g (W0 + s w_g B_g A_g) x + s w_l B_l A_l x)``.
(In training with dropout PEFT adds ``(c_k - 1) W0 x' + c_k s w_k B_k A_k x'`` per role
instead, x' the dropped-out input: the same for one role, not for two; FedDPA-T refuses it.)
A per-instance weight tensor would need one norm per batch row, which PEFT's DoRA cannot
compute: :data:`DORA_PER_INSTANCE` is the refusal.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model
from peft.tuners.lora import LoraLayer

from fedblend.comm.codec import BASE_DELTA
from fedblend.config import LoraConfig

ROLES = ("global", "local")
LORA_KINDS = ("lora_A", "lora_B")
MAGNITUDE = "lora_magnitude_vector"  # DoRA's magnitude m (1-D, d_out), PEFT's parameter name
BASE_DELTA_FILE = "base_delta.safetensors"  # an exported base-weight delta (FLoRA, FedEx-LoRA)
Tensors = dict[str, torch.Tensor]
Weight = float | torch.Tensor


class DualLoRA:
    """A frozen backbone wrapped by PEFT with one LoRA adapter per role.

    Precision: the backbone's weights stay in whatever ``model.dtype`` loaded them in (bfloat16
    on the reduced-precision path), but the LoRA tensors are always float32, and so is the AdamW
    state built on them. bfloat16 keeps 8 bits of mantissa: near 0.02 (a typical LoRA A entry)
    its values are 1.2e-4 apart, so an update under about 6e-5 rounds to nothing. AdamW's steps
    are about ``lr`` in size and the linear decay takes ``lr`` below that at the end of every
    local update (near it, an update moves a weight by one whole spacing or not at all): in
    bfloat16 tensors training would stall there, and the optimizer's moment estimates would
    lose their low bits likewise. The
    matrix products still run in bfloat16 under autocast (``fedblend.device.autocast``): only
    the stored tensors and their updates are float32, the usual mixed-precision recipe. PEFT's
    ``autocast_adapter_dtype`` already makes new adapters float32; :meth:`__init__` checks it.
    """

    def __init__(self, base_model: torch.nn.Module, cfg: LoraConfig, roles=ROLES) -> None:
        self.cfg = cfg
        self.roles = tuple(roles)
        peft_cfg = PeftLoraConfig(
            r=cfg.r,
            lora_alpha=cfg.alpha,
            lora_dropout=cfg.dropout,
            target_modules=list(cfg.target_modules),
            bias="none",
            task_type="CAUSAL_LM",
            use_dora=cfg.dora,
        )
        try:
            self.model = get_peft_model(base_model, peft_cfg, adapter_name=self.roles[0])
        except ValueError as e:
            raise _target_error(cfg, e) from None
        for role in self.roles[1:]:
            self.model.add_adapter(role, peft_cfg)
        for name, p in self.model.named_parameters():  # see the class docstring: never bfloat16
            if "lora_" in name and p.dtype != torch.float32:
                p.data = p.data.float()
        self.model.base_model.set_adapter(list(self.roles))
        self._active = list(self.roles)  # the layers' active adapters (see _set_active)
        self.layers = [m for m in self.model.modules() if isinstance(m, LoraLayer)]
        self.scale = {role: float(self.layers[0].scaling[role]) for role in self.roles}
        self._peft_scale = dict(self.scale)  # alpha / r, what set_scale's factor multiplies
        # role -> {peft key without adapter name: live parameter}
        self.params: dict[str, dict[str, torch.nn.Parameter]] = {r: {} for r in self.roles}
        for name, p in self.model.named_parameters():
            for role in self.roles:
                tag = f".{role}."
                if tag in name:
                    self.params[role][name.replace(tag, ".")] = p
        self.set_trainable(())
        self.skip_zero_roles = True  # see _skippable; False runs every role (benchmarks)
        self.mix_weights: dict[str, Weight] = {}
        self._apply_mix({role: 1.0 for role in self.roles})

    # ---- adapter tensors -------------------------------------------------------------
    def get(self, role: str) -> Tensors:
        """A detached CPU copy of the role's adapter tensors (PEFT key names): what messages,
        aggregation and checkpoints hold, wherever the model computes."""
        return {k: p.detach().to("cpu", copy=True) for k, p in self.params[role].items()}

    def set(self, role: str, tensors: Mapping[str, torch.Tensor]) -> None:
        own = self.params[role]
        if set(tensors) != set(own):
            missing = sorted(set(own) - set(tensors))[:3]
            extra = sorted(set(tensors) - set(own))[:3]
            raise ValueError(f"adapter '{role}' tensors do not match: missing {missing}, extra {extra}")
        with torch.no_grad():
            for k, p in own.items():
                p.copy_(tensors[k])

    def fresh(self, role: str, seed: int) -> Tensors:
        """Re-initialise the role's adapter as PEFT does (A Kaiming-uniform, B zero), seeded.

        A is drawn on the CPU and copied, so a seed gives the same adapter on every device. With
        DoRA (``lora.dora``) the magnitude m is reset as PEFT's adapter creation sets it: the
        row norms of ``W0 + s B A`` = of W0 (B = 0), from the dequantised weight."""
        with torch.random.fork_rng(), torch.no_grad():
            torch.manual_seed(seed)
            for layer in self.layers:
                a = layer.lora_A[role].weight
                init = torch.empty(a.shape, dtype=a.dtype)
                torch.nn.init.kaiming_uniform_(init, a=math.sqrt(5))  # PEFT's reset_lora_parameters
                a.copy_(init)
                layer.lora_B[role].weight.zero_()
                if role in layer.lora_magnitude_vector:
                    layer.lora_magnitude_vector[role].weight.copy_(_initial_magnitude(layer, role))
        return self.get(role)

    def set_scaling(self, role: str, s: float) -> None:
        """The role's LoRA scaling ``s`` (a client at its own rank: ``lora.scaling_for(r_i)``)."""
        self.scale[role] = float(s)
        self._apply_mix(self.mix_weights)

    def attach(self, role: str, params: Mapping[str, torch.nn.Parameter]) -> None:
        """Register tensors that are not a PEFT LoRA adapter (FedALT's per-layer router) under
        ``role``, so :meth:`get` / :meth:`set` (checkpoints, evaluation's ``load_into``) handle
        them like an adapter's. The role is not in :attr:`roles`: it takes no part in mixing,
        training selection or export, and cross-client batched evaluation leaves it alone."""
        if role in self.roles:
            raise ValueError(f"'{role}' is a LoRA role of this model")
        self.params[role] = dict(params)

    def num_parameters(self, role: str) -> int:
        return sum(p.numel() for p in self.params[role].values())

    # ---- training / mixing ---------------------------------------------------------------
    def set_trainable(self, roles, frozen: tuple[str, ...] = ()) -> None:
        """Only the named roles' tensors receive gradients; the others are stop-gradient.

        ``frozen`` holds tensor kinds (``"lora_A"``, ``"lora_B"``) kept frozen even in a
        trainable role (FFA-LoRA trains B only)."""
        for role in self.roles:
            for k, p in self.params[role].items():
                p.requires_grad_(role in roles and tensor_kind(k) not in frozen)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for r in self.roles for p in self.params[r].values() if p.requires_grad]

    def _apply_mix(self, weights: Mapping[str, Weight]) -> None:
        for role in self.roles:
            w = weights.get(role, 0.0)
            if isinstance(w, torch.Tensor) and w.dim() == 1:
                w = w.view(-1, 1, 1)
            # PEFT's LoraLayer.set_scale(adapter, factor) sets scaling = factor * alpha / r; the
            # factor may be a (batch, 1, 1) tensor (PEFT multiplies the LoRA output by scaling,
            # which broadcasts). A client at its own rank (set_scaling) folds s / (alpha / r) in.
            ratio = self.scale[role] / self._peft_scale[role]
            factor = w if ratio == 1.0 else w * ratio
            for layer in self.layers:
                layer.set_scale(role, factor)
        self.mix_weights = dict(weights)
        self._set_active([r for r in self.roles if not self._skippable(r, weights.get(r, 0.0))])

    def _skippable(self, role: str, w: Weight) -> bool:
        """A role weighted by the plain number 0 that takes no gradient contributes nothing:
        its LoRA branch (dropout and two matmuls per target layer) need not run at all.

        With DoRA it must not run: PEFT's DoRA term ``(m / ||W0 + s w B A|| - 1) W0 x`` has no
        factor w, so an active role at w = 0 would still rescale W0 x by ``m / ||W0||``."""
        if (not self.skip_zero_roles and not self.cfg.dora) or isinstance(w, torch.Tensor) or w != 0:
            return False
        return not any(p.requires_grad for p in self.params[role].values())

    def _set_active(self, roles: list[str]) -> None:
        # PEFT's public LoraLayer.set_adapter chooses the adapters its forward runs (same order).
        # It also sets requires_grad (inference_mode=True: all frozen), so ours is restored
        # after it; and it costs about a millisecond per layer, so it runs only on a change.
        # (The model-level set_adapter would walk every module twice on top: 100 ms a call on
        # SmolLM2 where this is all the per-batch mixing costs.)
        if list(roles) == self._active:
            return
        grads = [(p, p.requires_grad) for named in self.params.values() for p in named.values()]
        for layer in self.layers:
            layer.set_adapter(list(roles), inference_mode=True)
        for p, g in grads:
            p.requires_grad_(g)
        self._active = list(roles)

    @contextlib.contextmanager
    def mixing(self, weights: Mapping[str, Weight]) -> Iterator[None]:
        """Mix adapters with per-role weights: a float, or a 1-D tensor (one per instance).

        Roles not named get weight 0 (they do not contribute). A role whose weight is the
        number 0 and whose tensors take no gradient is not computed at all (inactive in every
        LoRA layer) for the duration of the context.
        """
        previous = self.mix_weights
        self._apply_mix(weights)
        try:
            yield
        finally:
            self._apply_mix(previous)

    # ---- export ---------------------------------------------------------------------------
    def export(self, role: str, tensors: Mapping[str, torch.Tensor], out_dir: Path) -> Path:
        """Write ``tensors`` as a PEFT adapter directory loadable by ``PeftModel.from_pretrained``."""
        if role == BASE_DELTA:  # not an adapter: the base-weight delta, as a safetensors file
            return self.export_base_delta(tensors, out_dir)
        saved = self.get(role)
        self.set(role, tensors)
        out_dir = Path(out_dir)
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=".tmp-"))
        try:
            self.model.save_pretrained(tmp, selected_adapters=[role])
            src = tmp / role if (tmp / role).is_dir() else tmp
            cfg_path = src / "adapter_config.json"
            meta = json.loads(cfg_path.read_text())
            meta["inference_mode"] = True
            cfg_path.write_text(json.dumps(meta, indent=2))
            if out_dir.exists():
                shutil.rmtree(out_dir)
            shutil.move(str(src), str(out_dir))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            self.set(role, saved)
        return out_dir


    # ---- a dense increment of the frozen base weights (FLoRA, FedEx-LoRA) -------------------
    def base_layers(self) -> dict[str, LoraLayer]:
        """The adapted layers by PEFT module prefix (the part of a LoRA key before ``.lora_A.``)."""
        return {name: m for name, m in self.model.named_modules() if isinstance(m, LoraLayer)}

    def set_base_delta(self, deltas: Mapping[str, torch.Tensor]) -> None:
        """Set each adapted layer's frozen weight to ``W0 + delta`` (``deltas``: PEFT module
        prefix -> ``d_out x d_in``, nn.Linear layout; a fan_in_fan_out layer such as GPT-2's
        Conv1D, which stores the transpose, gets it transposed). Layers not named go back to
        ``W0``. ``W0`` is kept on the first call, so setting is idempotent: the in-process
        engine's one backbone takes each simulated client's own delta in turn. The sum is
        formed in float32 and stored in the weight's dtype."""
        own = self.base_layers()
        unknown = sorted(set(deltas) - set(own))
        if unknown:
            raise ValueError(f"base delta names unknown layers: {unknown[:3]}")
        w0 = self.__dict__.setdefault("_w0", {})
        with torch.no_grad():
            for prefix, layer in own.items():
                w = layer.get_base_layer().weight
                if prefix not in w0:
                    if prefix not in deltas:
                        continue  # never changed: W0 as loaded
                    w0[prefix] = w.detach().clone()
                d = deltas.get(prefix)
                if d is None:
                    w.copy_(w0[prefix])
                    continue
                d = d.t() if getattr(layer, "fan_in_fan_out", False) else d
                if tuple(d.shape) != tuple(w.shape):
                    raise ValueError(f"base delta {prefix}: shape {list(d.shape)}, weight {list(w.shape)}")
                w.copy_((w0[prefix].float() + d.to(w.device, torch.float32)).to(w.dtype))

    def base_delta_file(self, deltas: Mapping[str, torch.Tensor]) -> Tensors:
        """``deltas`` as a file to add to the base model's own weights: keyed by the base
        weight's name in the model ``from_pretrained`` loads (``model.layers.0.self_attn.q_proj.weight``)
        and in that weight's layout (GPT-2 Conv1D: transposed), float32."""
        own = self.base_layers()
        strip = "base_model.model."
        out: Tensors = {}
        for prefix, d in sorted(deltas.items()):
            layer = own[prefix]
            d = d.t() if getattr(layer, "fan_in_fan_out", False) else d
            out[f"{prefix.removeprefix(strip)}.weight"] = d.detach().to("cpu", torch.float32).contiguous()
        return out

    def export_base_delta(self, deltas: Mapping[str, torch.Tensor], out_dir: Path) -> Path:
        """Write :meth:`base_delta_file` as ``out_dir/base_delta.safetensors`` (atomically)."""
        from safetensors.torch import save_file

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / BASE_DELTA_FILE
        tmp = out_dir / f".{BASE_DELTA_FILE}.tmp"
        save_file(self.base_delta_file(deltas), str(tmp),
                  metadata={"format": "add to the base model's weights of the same names (W = W0 + delta)"})
        tmp.replace(path)
        return path


def tensor_kind(key: str) -> str:
    """``"lora_A"``, ``"lora_B"`` or (DoRA) ``"lora_magnitude_vector"``: which part of a LoRA
    layer a PEFT tensor name holds."""
    for kind in (*LORA_KINDS, MAGNITUDE):
        if f".{kind}." in key:
            return kind
    raise ValueError(f"not a LoRA A/B tensor: {key}")


def split_kinds(tensors: Mapping[str, torch.Tensor]) -> dict[str, Tensors]:
    """Split one adapter's tensors by factor: ``{"lora_A": {...}, "lora_B": {...}}``.

    FedSA-LoRA and FFA-LoRA share one factor and keep the other; each factor then travels
    (or stays) as a role of its own, so the engine's role check guards the private one.
    DoRA's magnitude vectors go with B (:data:`MAGNITUDE_WITH`): FedSA-LoRA keeps them local
    beside its client-specific B, FFA-LoRA trains and shares them beside its shared B."""
    out: dict[str, Tensors] = {kind: {} for kind in LORA_KINDS}
    for k, t in tensors.items():
        kind = tensor_kind(k)
        out[MAGNITUDE_WITH if kind == MAGNITUDE else kind][k] = t
    return out


MAGNITUDE_WITH = "lora_B"  # the split_kinds part DoRA's magnitude vectors travel (or stay) with


def join_kinds(*parts: Mapping[str, torch.Tensor]) -> Tensors:
    """The inverse of :func:`split_kinds`: one adapter from its A and B tensors."""
    out: Tensors = {}
    for part in parts:
        out.update(part)
    return out


def _initial_magnitude(layer: LoraLayer, role: str) -> torch.Tensor:
    """m as PEFT's DoRA sets it at adapter creation (``DoraLinearLayer.update_layer``): the row
    norms of ``W0 + s B A`` with B = 0, W0 dequantised (bitsandbytes), through PEFT's own
    ``get_weight_norm`` so the numbers are the same."""
    from peft.utils.integrations import dequantize_module_weight

    dora = layer.lora_magnitude_vector[role]
    a, b = layer.lora_A[role].weight, layer.lora_B[role].weight
    base = layer.get_base_layer()
    if base.__class__.__name__ == "Linear4bit":  # PEFT dequantises a copy (FSDP); same numbers
        base = copy.deepcopy(base)
    weight = dequantize_module_weight(base)
    norm = dora.get_weight_norm(weight=weight.to(a.device), lora_weight=torch.zeros_like(b @ a),
                                scaling=layer.scaling[role])
    return norm.to(dora.weight.dtype)


DORA_PER_INSTANCE = (
    "lora.dora: PEFT's DoRA divides by one weight norm per layer, with the adapter's scaling inside it; "
    "per-instance mixing weights (feddpa.weighting = dynamic) need one per row: use static, global or local"
)


def _target_error(cfg: LoraConfig, e: Exception):
    from fedblend.errors import ConfigError

    return ConfigError(f"lora.target_modules: {cfg.target_modules} not found in the model ({e})")


def rank_of(tensors: Mapping[str, torch.Tensor]) -> int:
    """The LoRA rank of an adapter's tensors (rows of its A matrices)."""
    for k, t in tensors.items():
        if tensor_kind(k) == "lora_A":
            return int(t.shape[0])
    raise ValueError("no lora_A tensor")


def truncate_rank(tensors: Mapping[str, torch.Tensor], r: int) -> Tensors:
    """The first ``r`` rank components: ``A[:r, :]``, ``B[:, :r]`` (other tensors as they are)."""
    out: Tensors = {}
    for k, t in tensors.items():
        kind = _kind_or_none(k)
        out[k] = t[:r, :].clone() if kind == "lora_A" else t[:, :r].clone() if kind == "lora_B" else t
    return out


def pad_rank(tensors: Mapping[str, torch.Tensor], r: int) -> Tensors:
    """Zero-pad to rank ``r`` (A rows, B columns). A zero-padded adapter trains exactly as the
    smaller one: the padded rows and columns get zero gradients (each is the other's factor),
    so AdamW, weight decay and norm clipping leave them at zero."""
    out: Tensors = {}
    for k, t in tensors.items():
        kind = _kind_or_none(k)
        if kind == "lora_A":
            out[k] = torch.cat([t, t.new_zeros(r - t.shape[0], t.shape[1])], 0)
        elif kind == "lora_B":
            out[k] = torch.cat([t, t.new_zeros(t.shape[0], r - t.shape[1])], 1)
        else:
            out[k] = t
    return out


def _kind_or_none(key: str) -> str | None:
    try:
        return tensor_kind(key)
    except ValueError:
        return None
