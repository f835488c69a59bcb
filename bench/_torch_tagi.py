"""The PyTorch side of bench/train_step.py: Hugging Face T5s loaded with *our* weights, the original TAGI code's
way of applying generated LoRA factors, and the stage-2 loss, so that one step of each side computes the same
function from the same numbers.

* `hf_t5`: a `transformers.T5ForConditionalGeneration` holding the weights of a `tagi_jax` T5 tree
  (`tagi_jax.hf.to_hf_state_dict`, the mapping tests/test_export.py checks).
* `DynamicLoRALinear`: the original code's `HyperLora` (Xnhyacinth/TAGI, src/model.py): it wraps a q or v
  `nn.Linear` and asks for its factors *inside every forward call*, then computes
  ``linear(x) + scale·((x·A)·B)`` with per-example A [b, d_in, r], B [b, r, d_out].
* `TorchHyperNetwork`: `tagi_jax.models.hypernet.HyperNetwork` re-written in torch, parameter for parameter (same
  names, same layouts): the instruction code is computed once per forward (the original's `set_features`), and
  each wrapped projection regenerates its own (target, layer) factors from it, as `HyperLora` does.
* `TorchTAGI`: the stage-2 step's loss, ``CE + λ1·KL(teacher ‖ student) + sigmoid(L_ins)·L_ins``, with the student
  (HF T5 + hypernetwork, the encoded instruction prepended to the decoder's memory: fusion "prepend") and a frozen
  teacher T5 whose LoRA rows are gathered per example from the teacher table, reading the full instruction.

The package never imports this module (nor torch).
"""
from __future__ import annotations

import tempfile
from typing import Any, Callable, Mapping, Optional

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from torch import nn

from tagi_jax import features as FEAT
from tagi_jax.hf import hf_module_name, save_t5_hf
from tagi_jax.models import lora

Factors = Optional[tuple[torch.Tensor, torch.Tensor, float]]


def tensor(x: Any) -> torch.Tensor:
    return torch.from_numpy(np.array(x, copy=True))


def hf_t5(config, t5_params: Mapping[str, Any]) -> transformers.T5ForConditionalGeneration:
    """A HF T5 (float32, train mode, transformers' default attention) with the weights of our `t5_params`, loaded
    with `from_pretrained` from `tagi_jax.hf.save_t5_hf`'s export: transformers >= 5 always ties `lm_head` to the
    shared embedding on construction and unties it only when a checkpoint's weights differ."""
    with tempfile.TemporaryDirectory(prefix="bench_hf_t5_") as directory:
        save_t5_hf(directory, config, t5_params)
        model = transformers.T5ForConditionalGeneration.from_pretrained(directory)
    if (model.lm_head.weight is model.shared.weight) != bool(config.tie_word_embeddings):
        raise AssertionError("hf_t5: transformers did not keep the checkpoint's (un)tied output projection")
    return model.train()


def hf_state_dict(model: nn.Module) -> dict[str, np.ndarray]:
    """HF names -> numpy of a (possibly wrapped) T5: wrapper levels (`.linear`, PEFT's `base_model.model.`,
    `.base_layer`) are stripped, LoRA factors left out."""
    out = {}
    for name, value in model.state_dict().items():
        if "lora_" in name:
            continue
        for prefix in ("base_model.model.",):
            name = name[len(prefix):] if name.startswith(prefix) else name
        name = name.replace(".linear.", ".").replace(".base_layer.", ".")
        out[name] = value.detach().numpy()
    return out


class DynamicLoRALinear(nn.Module):
    """`linear(x) + scale·((x·A)·B)` with the factors fetched from `factors_fn()` at every call (None: plain)."""

    def __init__(self, linear: nn.Linear, factors_fn: Callable[[], Factors]):
        super().__init__()
        self.linear = linear
        self.factors_fn = factors_fn
        self.last: Optional[tuple[torch.Tensor, torch.Tensor]] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.linear(x)
        factors = self.factors_fn()
        if factors is None:
            return out
        a, b, scale = factors
        self.last = (a, b)
        return out + scale * torch.matmul(torch.matmul(x, a), b)


def wrap_targets(model: nn.Module, targets, num_layers_of: Callable[[str], int],
                 factors_for: Callable[[int, str, int], Callable[[], Factors]]) -> dict[str, list]:
    """Replace every (target, layer) projection of `model` by a `DynamicLoRALinear`; {target: [wrappers]}."""
    wrappers: dict[str, list] = {}
    for index, target in enumerate(targets):
        wrappers[target] = []
        for layer in range(num_layers_of(target)):
            parent_name, attr = hf_module_name(target, layer).rsplit(".", 1)
            parent = model.get_submodule(parent_name)
            wrapper = DynamicLoRALinear(getattr(parent, attr), factors_for(index, target, layer))
            setattr(parent, attr, wrapper)
            wrappers[target].append(wrapper)
    return wrappers


def _act(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    # flax.linen.gelu is the tanh approximation
    return (lambda x: F.gelu(x, approximate="tanh")) if name == "gelu" else F.relu


class TorchHyperNetwork(nn.Module):
    """`HyperNetwork` of tagi_jax.models.hypernet with its parameters (flax names and layouts, float32)."""

    def __init__(self, config, t5_config, params: Mapping[str, Any]):
        super().__init__()
        self.config, self.act = config, _act(config.activation)
        self.specs = [lora.target_spec(t5_config, t) for t in config.adapter_targets]
        self.top = nn.ParameterDict({k: nn.Parameter(tensor(v)) for k, v in params.items()
                                     if not isinstance(v, Mapping)})
        self.heads = nn.ModuleDict({
            _key(s.name): nn.ParameterDict({k: nn.Parameter(tensor(v)) for k, v in params[s.name].items()})
            for s in self.specs})
        self.code: Optional[torch.Tensor] = None

    def set_instruction(self, pooled: Optional[torch.Tensor]) -> None:
        """The instruction code [b, embed_dim] every wrapped projection reads (None: adapters off)."""
        if pooled is None:
            self.code = None
            return
        p = self.top
        h = self.act(pooled @ p["proj_in_kernel"] + p["proj_in_bias"])
        self.code = h @ p["proj_out_kernel"] + p["proj_out_bias"]

    def factors(self, index: int, target: str, layer: int) -> Factors:
        """(A [b, d_in, r], B [b, r, d_out], scale) of one target and layer, computed now from the code."""
        if self.code is None:
            return None
        cfg, p, head = self.config, self.top, self.heads[_key(target)]
        code_part = self.code @ p["trunk_code_kernel"]
        layer_part = p["layer_embedding"][layer] @ p["trunk_layer_kernel"]
        module_part = p["module_embedding"][index] @ p["trunk_module_kernel"] + p["trunk_bias"]
        z = self.act(code_part + layer_part + module_part)  # [b, H]
        if cfg.head == "dense":
            out = []
            for f in ("A", "B"):
                kernel, bias = head[f"{f}_kernel"], head[f"{f}_bias"]
                if not cfg.share_generator_across_layers:
                    kernel, bias = kernel[layer], bias[layer]
                out.append(torch.einsum("bh,hxy->bxy", z, kernel) + bias)
        else:
            out = []
            for f in ("A", "B"):
                u = z @ head[f"{f}_coefficients"]
                if cfg.head == "bottleneck":
                    u = self.act(u + head[f"{f}_coefficients_bias"])
                out.append(torch.einsum("bk,kxy->bxy", u, head[f"{f}_basis"]) + head[f"{f}_bias"])
        return out[0], out[1], cfg.scale

    def flax_params(self) -> dict[str, Any]:
        out = {k: v.detach().numpy() for k, v in self.top.items()}
        for s in self.specs:
            out[s.name] = {k: v.detach().numpy() for k, v in self.heads[_key(s.name)].items()}
        return out


def _key(target: str) -> str:
    return target.replace(".", "__")  # torch module names cannot hold dots


# ------------------------------------------------------------------------------------------------ losses
def token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    per_token = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
    return (per_token * weights.flatten()).sum() / weights.sum().clamp_min(1.0)


def distillation_kl(student: torch.Tensor, teacher: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """KL(teacher ‖ student) per real target token, averaged (temperature 1)."""
    s_log = F.log_softmax(student, dim=-1)
    t_log = F.log_softmax(teacher.detach(), dim=-1)
    per_token = (t_log.exp() * (t_log - s_log)).sum(-1)
    return (per_token * weights).sum() / weights.sum().clamp_min(1.0)


def _gram_trace(a1, b1, a2, b2) -> torch.Tensor:
    """<A1·B1, A2·B2>_F from r×r products: [..., d_in, r] x [..., r, d_out] -> [...]."""
    left = a1.transpose(-1, -2) @ a2
    right = b2 @ b1.transpose(-1, -2)
    return (left * right.transpose(-1, -2)).sum((-1, -2))


def alignment_mean(generated: Mapping[str, tuple], teacher: Mapping[str, tuple], g_scale: float,
                   t_scale: float) -> torch.Tensor:
    """L_ins with `loss.alignment="delta"`, `alignment_reduction="mean"` (tagi_jax.losses.alignment_loss):
    Σ_targets mean_b Σ_layers ‖ΔW_gen − ΔW_teacher‖²_F / (layers·d_in·d_out); factors [b, layers, ...]."""
    total = torch.zeros(())
    for target in sorted(generated):
        ga, gb = generated[target]
        ta, tb = (x.detach() for x in teacher[target])
        sq = (g_scale ** 2 * _gram_trace(ga, gb, ga, gb) + t_scale ** 2 * _gram_trace(ta, tb, ta, tb)
              - 2.0 * g_scale * t_scale * _gram_trace(ga, gb, ta, tb)).clamp_min(0.0)
        total = total + sq.sum(-1).mean() / (ga.shape[-3] * ga.shape[-2] * gb.shape[-1])
    return total


def hf_logits(model: nn.Module, encoder_tokens: torch.Tensor, batch: Mapping[str, torch.Tensor],
              memory: Optional[torch.Tensor] = None, memory_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Teacher-forced logits; with `memory`, the decoder cross-attends to it instead of encoding the tokens."""
    targets = batch[FEAT.DECODER_TARGET_TOKENS]
    kwargs = dict(decoder_input_ids=batch[FEAT.DECODER_INPUT_TOKENS], decoder_attention_mask=targets > 0,
                  use_cache=False)
    if memory is None:
        return model(input_ids=encoder_tokens, attention_mask=encoder_tokens > 0, **kwargs).logits
    return model(encoder_outputs=(memory,), attention_mask=memory_mask, **kwargs).logits


def masked_mean(states: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    mask = (tokens > 0).to(states.dtype)[..., None]
    return (states * mask).sum(1) / mask.sum(1).clamp_min(1.0)


class TorchTAGI(nn.Module):
    """The stage-2 student and its frozen teacher, from our {"student", "teacher"} finetune tree."""

    def __init__(self, model_config, params: Mapping[str, Any], lambda_kl: float = 5.0):
        super().__init__()
        if model_config.fusion != "prepend" or model_config.separate_hyper_encoder:
            raise ValueError("TorchTAGI re-creates fusion='prepend' with the backbone's encoder only")
        t5_cfg, self.lambda_kl = model_config.t5, float(lambda_kl)
        self.targets = model_config.adapter_targets
        self.g_scale, self.t_scale = model_config.hypernet.scale, model_config.teacher_scale
        layers_of = lambda target: lora.adapter_dims(t5_cfg, target)[0]  # noqa: E731
        self.student = hf_t5(t5_cfg, params["student"]["t5"])
        self.hypernet = TorchHyperNetwork(model_config.hypernet, t5_cfg, params["student"]["hypernet"])
        self.student_wrappers = wrap_targets(
            self.student, self.targets, layers_of,
            lambda index, target, layer: (lambda: self.hypernet.factors(index, target, layer)))
        self.teacher = hf_t5(t5_cfg, params["teacher"]["t5"]).requires_grad_(False)
        table = params["teacher"]["teachers"]
        self.table = {t: (tensor(table[t]["A"]), tensor(table[t]["B"])) for t in self.targets}
        self.rows: Optional[torch.Tensor] = None
        wrap_targets(self.teacher, self.targets, layers_of,
                     lambda index, target, layer: (lambda: self._teacher_factors(target, layer)))

    def _teacher_factors(self, target: str, layer: int) -> Factors:
        a, b = self.table[target]
        return a[self.rows, layer], b[self.rows, layer], self.t_scale

    def trainable(self) -> list[nn.Parameter]:
        return list(self.student.parameters()) + list(self.hypernet.parameters())

    def loss(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        hyper_tokens, tokens = batch[FEAT.HYPER_ENCODER_INPUT_TOKENS], batch[FEAT.ENCODER_INPUT_TOKENS]
        encoder = self.student.get_encoder()
        self.hypernet.set_instruction(None)  # the instruction is read by the plain backbone
        states = encoder(input_ids=hyper_tokens, attention_mask=hyper_tokens > 0).last_hidden_state
        self.hypernet.set_instruction(masked_mean(states, hyper_tokens))
        encoded = encoder(input_ids=tokens, attention_mask=tokens > 0).last_hidden_state
        memory = torch.cat([states, encoded], dim=1)
        memory_mask = torch.cat([hyper_tokens > 0, tokens > 0], dim=1)
        logits = hf_logits(self.student, tokens, batch, memory, memory_mask)
        generated = {t: tuple(torch.stack([w.last[i] for w in ws], dim=1) for i in (0, 1))
                     for t, ws in self.student_wrappers.items()}
        with torch.no_grad():
            self.rows = batch[FEAT.TASK_ID]
            t_logits = hf_logits(self.teacher, batch[FEAT.FULL_ENCODER_INPUT_TOKENS], batch)
            t_factors = {t: (self.table[t][0][self.rows], self.table[t][1][self.rows]) for t in self.targets}
        weights = batch[FEAT.DECODER_LOSS_WEIGHTS].to(logits.dtype)
        ce = token_cross_entropy(logits, batch[FEAT.DECODER_TARGET_TOKENS], weights)
        kl = distillation_kl(logits, t_logits, weights)
        l_ins = alignment_mean(generated, t_factors, self.g_scale, self.t_scale)
        return ce + self.lambda_kl * kl + torch.sigmoid(l_ins.detach()) * l_ins


class TorchStep:
    """One optimizer update of `loss_fn()` over `params`: backward, global-norm clipping, AdamW (optax's
    settings: no weight decay, eps outside the square root)."""

    def __init__(self, loss_fn: Callable[[], torch.Tensor], params, *, learning_rate: float, clip_norm: float,
                 b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8):
        self.loss_fn, self.params, self.clip_norm = loss_fn, [p for p in params if p.requires_grad], clip_norm
        self.optimizer = torch.optim.AdamW(self.params, lr=learning_rate, betas=(b1, b2), eps=eps, weight_decay=0.0)

    def __call__(self) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss_fn()
        loss.backward()
        if self.clip_norm:
            torch.nn.utils.clip_grad_norm_(self.params, self.clip_norm)
        self.optimizer.step()
        return float(loss.detach())


def torch_batch(batch: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.as_tensor(np.asarray(v), dtype=torch.float32 if k == FEAT.DECODER_LOSS_WEIGHTS else torch.long)
            for k, v in batch.items()}
