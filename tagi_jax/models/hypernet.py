"""The hypernetwork: an encoded instruction in, LoRA factors for every target and layer out.
The encoder is not part of this module: `tagi_jax.models.tagi.TAGI` encodes with the backbone's encoder.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from tagi_jax.models import lora
from tagi_jax.models.t5_config import DictConfig, T5Config


HEADS = ("dense", "factorised", "bottleneck")


@dataclasses.dataclass(frozen=True)
class HyperNetConfig(DictConfig):
    """What the hypernetwork generates and how wide it is."""
    _unknown_keys_message = "hypernet: unknown keys"
    adapter_targets: tuple[str, ...] = lora.DEFAULT_TARGETS
    rank: int = 32
    lora_alpha: float = 32.0          # scale = lora_alpha / rank (PEFT convention)
    hidden_dim: int = 512             # width of projection and trunk ('hyper_hidden')
    embed_dim: int = 128              # instruction code, layer and module embeddings ('adapter_embed')
    share_generator_across_layers: bool = True
    dropout_rate: float = 0.1
    activation: str = "gelu"          # "gelu" or "relu"
    # How z [H] becomes A [d_in, r] and B [r, d_out]: "dense" (one H x d_in·r kernel per factor: ~151 M
    # parameters at T5-Base with H=512), "factorised" (that kernel as a rank-`head_dim` product: H x head_dim
    # coefficients times head_dim basis matrices) or "bottleneck" (the original code's: a width-`head_dim`
    # hidden layer with the activation, then the output layer).
    head: str = "dense"
    head_dim: int = 8

    def __post_init__(self):
        object.__setattr__(self, "adapter_targets", tuple(self.adapter_targets))
        if not self.adapter_targets:
            raise ValueError("hypernet.adapter_targets must name at least one target")
        if len(set(self.adapter_targets)) != len(self.adapter_targets):
            raise ValueError(f"hypernet.adapter_targets has duplicates: {self.adapter_targets}")
        for target in self.adapter_targets:
            lora.split_target(target)
        for field in ("rank", "hidden_dim", "embed_dim"):
            if getattr(self, field) <= 0:
                raise ValueError(f"hypernet.{field} must be positive, got {getattr(self, field)}")
        if self.lora_alpha <= 0:
            raise ValueError(f"hypernet.lora_alpha must be positive, got {self.lora_alpha}")
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ValueError(f"hypernet.dropout_rate must be in [0, 1), got {self.dropout_rate}")
        if self.activation not in ("gelu", "relu"):
            raise ValueError(f"hypernet.activation: {self.activation!r} (expected 'gelu' or 'relu')")
        if self.head not in HEADS:
            raise ValueError(f"hypernet.head: {self.head!r} is not one of {HEADS}")
        if self.head != "dense" and not self.share_generator_across_layers:
            raise ValueError(f"hypernet.head={self.head!r} needs share_generator_across_layers=True")
        if self.head_dim <= 0:
            raise ValueError(f"hypernet.head_dim must be positive, got {self.head_dim}")

    @property
    def scale(self) -> float:
        return self.lora_alpha / self.rank

    def validate_for(self, t5: T5Config) -> None:
        """Check every target against the backbone (clear error naming the target)."""
        for target in self.adapter_targets:
            lora.target_spec(t5, target)



def masked_mean_pool(states: jax.Array, tokens: jax.Array) -> jax.Array:
    """Mean of `states [b, len, d]` over positions whose token is not padding (id 0) -> [b, d].

    Padding-aware, so appending padding never changes the result; an all-padding row pools to zeros.
    """
    mask = (tokens > 0).astype(jnp.float32)[..., None]
    total = jnp.sum(states.astype(jnp.float32) * mask, axis=1)
    count = jnp.maximum(jnp.sum(mask, axis=1), 1.0)
    return (total / count).astype(states.dtype)


def _param(module: nn.Module, name: str, init, shape, axes, dtype):
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


class HyperNetwork(nn.Module):
    """Pooled instruction states -> adapters pytree (see `tagi_jax.models.lora`).

    Pipeline (one batched call for a batch of instructions):

    1. `masked_mean_pool`: the instruction's encoder states are averaged over *real* tokens only. The original
       code averaged over padding too, so an instruction's adapter depended on how long the longest instruction
       of its batch was.
    2. `HyperNetwork` projects the pooled vector with an MLP to an instruction code (width `embed_dim`).
    3. A trunk combines the code with a learned *layer* embedding and a learned *module* (target) embedding,
       `z = act(W_c·code + W_l·layer + W_m·module + b)` (a dense layer on their concatenation, computed
       without materialising it), giving one hidden vector per (example, target, layer).
    4. Per-target heads map z to A [d_in, r] and B [r, d_out]; with `share_generator_across_layers=False`
       each layer has its own heads.

    Initialisation. Every B head (kernel and bias) starts at exactly zero and every A head is random, so
    the generated update ΔW = scale·A·B is exactly 0 at step 0 (the adapted projections start as the backbone's;
    the student as a whole does not when it also reads the encoded instruction: `prepend` fusion changes what the
    decoder attends to from the first step, only `none` and the zero-output encoder blocks do not) while
    learning can start: ∂L/∂B = scale·Aᵀ(∂L/∂ΔW) is non-zero because A is, so the B heads move at the first
    step, and from then on ∂L/∂A = scale·(∂L/∂ΔW)Bᵀ and the gradient to the trunk and encoder are non-zero
    too. The original code initialised *both* heads near zero: with A ≈ B ≈ 0 both gradients are ≈ 0
    (each is proportional to the other factor), the point (A, B) = (0, 0) is a stationary point of the
    bilinear map A·B with an indefinite Hessian — a saddle — so training leaves it only slowly, driven by
    the tiny initial values.

    The A heads are scaled so that generated A entries have variance ≈ 1/d_in, the magnitude of a
    PEFT-initialised LoRA A (kaiming-uniform, bound 1/sqrt(d_in)).
    """
    config: HyperNetConfig
    t5: T5Config

    def _act(self, x):
        return nn.gelu(x) if self.config.activation == "gelu" else nn.relu(x)

    @nn.compact
    def __call__(self, pooled: jax.Array, enable_dropout: bool = False) -> dict[str, dict[str, jax.Array]]:
        cfg, t5 = self.config, self.t5
        dtype, pdtype = t5.jnp_dtype, t5.jnp_param_dtype
        specs = [lora.target_spec(t5, t) for t in cfg.adapter_targets]
        max_layers = max(s.num_layers for s in specs)
        normal = nn.initializers.lecun_normal()
        zeros = nn.initializers.zeros_init()

        # Instruction code: pooled [b, d_model] -> [b, hidden] -> [b, embed_dim].
        x = nn.Dropout(cfg.dropout_rate, deterministic=not enable_dropout)(pooled.astype(dtype))
        w1 = _param(self, "proj_in_kernel", normal, (t5.d_model, cfg.hidden_dim), ("embed", "hyper_hidden"), pdtype)
        b1 = _param(self, "proj_in_bias", zeros, (cfg.hidden_dim,), ("hyper_hidden",), pdtype)
        h = self._act(jnp.dot(x, w1.astype(dtype)) + b1.astype(dtype))
        h = nn.with_logical_constraint(h, ("batch", "hyper_hidden"))
        w2 = _param(self, "proj_out_kernel", normal, (cfg.hidden_dim, cfg.embed_dim), ("hyper_hidden", "adapter_embed"), pdtype)
        b2 = _param(self, "proj_out_bias", zeros, (cfg.embed_dim,), ("adapter_embed",), pdtype)
        code = jnp.dot(h, w2.astype(dtype)) + b2.astype(dtype)  # [b, E]

        # Learned layer and module embeddings, mixed with the code by the trunk.
        emb_init = nn.initializers.normal(stddev=1.0)
        layer_emb = _param(self, "layer_embedding", emb_init, (max_layers, cfg.embed_dim), ("layers", "adapter_embed"), pdtype)
        module_emb = _param(self, "module_embedding", emb_init, (len(specs), cfg.embed_dim), (None, "adapter_embed"), pdtype)
        trunk_axes = ("adapter_embed", "hyper_hidden")
        wc = _param(self, "trunk_code_kernel", normal, (cfg.embed_dim, cfg.hidden_dim), trunk_axes, pdtype)
        wl = _param(self, "trunk_layer_kernel", normal, (cfg.embed_dim, cfg.hidden_dim), trunk_axes, pdtype)
        wm = _param(self, "trunk_module_kernel", normal, (cfg.embed_dim, cfg.hidden_dim), trunk_axes, pdtype)
        bt = _param(self, "trunk_bias", zeros, (cfg.hidden_dim,), ("hyper_hidden",), pdtype)
        code_part = jnp.dot(code, wc.astype(dtype))                                   # [b, H]
        layer_part = jnp.dot(layer_emb.astype(dtype), wl.astype(dtype))               # [L, H]
        module_part = jnp.dot(module_emb.astype(dtype), wm.astype(dtype)) + bt.astype(dtype)  # [T, H]

        adapters = {}
        for index, spec in enumerate(specs):
            z = self._act(
                code_part[:, None, :] + layer_part[None, : spec.num_layers, :] + module_part[index][None, None, :]
            )  # [b, layers, H]
            z = nn.with_logical_constraint(z, ("batch", "layers", "hyper_hidden"))
            a, b = GeneratorHeads(cfg, spec, dtype, pdtype, name=spec.name)(z)
            adapters[spec.name] = {"A": a, "B": b, "scale": jnp.asarray(cfg.scale, jnp.float32)}
        return adapters


class GeneratorHeads(nn.Module):
    """The A and B heads of one target: z [b, layers, H] -> A [b, layers, d_in, r], B [b, layers, r, d_out]."""
    config: HyperNetConfig
    spec: lora.TargetSpec
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, z: jax.Array) -> tuple[jax.Array, jax.Array]:
        cfg, spec = self.config, self.spec
        r, hdim = cfg.rank, cfg.hidden_dim
        shared = cfg.share_generator_across_layers
        lead = () if shared else (spec.num_layers,)
        lead_axes = () if shared else ("layers",)
        # Var(A) ≈ 1/d_in: fan-in over H, extra factor 1/d_in; per-layer kernels: the layer axis is a batch axis.
        a_init = nn.initializers.variance_scaling(
            1.0 / spec.d_in, "fan_in", "truncated_normal", in_axis=-3, out_axis=(-2, -1),
            batch_axis=(0,) if not shared else (),
        )
        zeros = nn.initializers.zeros_init()
        if cfg.head != "dense":
            return self._low_rank(z, a_init)
        wa = _param(self, "A_kernel", a_init, lead + (hdim, spec.d_in, r), lead_axes + ("hyper_hidden", spec.in_axis, "lora_rank"), self.param_dtype)
        ba = _param(self, "A_bias", zeros, lead + (spec.d_in, r), lead_axes + (spec.in_axis, "lora_rank"), self.param_dtype)
        wb = _param(self, "B_kernel", zeros, lead + (hdim, r, spec.d_out), lead_axes + ("hyper_hidden", "lora_rank", spec.out_axis), self.param_dtype)
        bb = _param(self, "B_bias", zeros, lead + (r, spec.d_out), lead_axes + ("lora_rank", spec.out_axis), self.param_dtype)
        z = z.astype(self.dtype)
        if shared:
            a = jnp.einsum("blh,hdr->bldr", z, wa.astype(self.dtype)) + ba.astype(self.dtype)
            b = jnp.einsum("blh,hro->blro", z, wb.astype(self.dtype)) + bb.astype(self.dtype)
        else:
            a = jnp.einsum("blh,lhdr->bldr", z, wa.astype(self.dtype)) + ba.astype(self.dtype)[None]
            b = jnp.einsum("blh,lhro->blro", z, wb.astype(self.dtype)) + bb.astype(self.dtype)[None]
        a = nn.with_logical_constraint(a, ("batch", "layers", None, "lora_rank"))
        b = nn.with_logical_constraint(b, ("batch", "layers", "lora_rank", None))
        return a, b

    def _low_rank(self, z: jax.Array, a_init) -> tuple[jax.Array, jax.Array]:
        """"factorised": u = z·C (linear), "bottleneck": u = act(z·C + c); then A = u·basis_A + bias, likewise B.
        B's basis starts at zero (ΔW = 0 at step 0); C is random, so B's basis learns from the first step."""
        cfg, spec, dt = self.config, self.spec, self.dtype
        r, k = cfg.rank, cfg.head_dim
        normal, zeros = nn.initializers.lecun_normal(), nn.initializers.zeros_init()
        out = []
        for factor, shape, axes, basis_init in (("A", (spec.d_in, r), (spec.in_axis, "lora_rank"), a_init),
                                               ("B", (r, spec.d_out), ("lora_rank", spec.out_axis), zeros)):
            coef = _param(self, f"{factor}_coefficients", normal, (cfg.hidden_dim, k), ("hyper_hidden", "head_factor"),
                          self.param_dtype)
            basis = _param(self, f"{factor}_basis", basis_init, (k,) + shape, ("head_factor",) + axes, self.param_dtype)
            bias = _param(self, f"{factor}_bias", zeros, shape, axes, self.param_dtype)
            u = jnp.einsum("blh,hk->blk", z.astype(dt), coef.astype(dt))
            if cfg.head == "bottleneck":
                u = self._act(u + _param(self, f"{factor}_coefficients_bias", zeros, (k,), ("head_factor",),
                                         self.param_dtype).astype(dt))
            out.append(jnp.einsum("blk,kxy->blxy", u, basis.astype(dt)) + bias.astype(dt))
        a = nn.with_logical_constraint(out[0], ("batch", "layers", None, "lora_rank"))
        b = nn.with_logical_constraint(out[1], ("batch", "layers", "lora_rank", None))
        return a, b

    def _act(self, x):
        return nn.gelu(x) if self.config.activation == "gelu" else nn.relu(x)
