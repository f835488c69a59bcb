"""The two sides of each variant of bench/train_step.py, built from the same weights and batch: shapes, random
inputs, weights (ours, exported to Hugging Face for torch), our compiled step (`JaxStep`: the package's
`tagi_jax.trainer.steps.train_step`, as the trainer jits it) and torch's (`TorchSide`), and each side's parts
(forward, forward+backward, optimizer update) for `--breakdown`.

`settings` is bench/train_step.py's `Settings` (seed, learning_rate, head, torch_threads, torch_compile).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bench import _common as C
from tagi_jax import features as FEAT
from tagi_jax.hf import hf_module_name, to_hf_state_dict
from tagi_jax.models import lora
from tagi_jax.models import tagi as tagi_lib
from tagi_jax.models.hypernet import HyperNetConfig, HyperNetwork
from tagi_jax.models.t5 import init_params as t5_init_params
from tagi_jax.models.t5_config import T5Config
from tagi_jax.models.teachers import TeacherTable
from tagi_jax.run import defaults, objectives, stages
from tagi_jax.trainer import optim, steps
from tagi_jax.trainer.train_state import TrainState

VARIANTS = ("full_finetune", "lora", "tagi")
TARGETS = lora.DEFAULT_TARGETS  # q and v of encoder self-, decoder self- and cross-attention ("q", "v" in PEFT)
LORA_ALPHA = 32.0


@dataclasses.dataclass(frozen=True)
class Shapes:
    """Model and batch sizes. The TAGI batch splits `enc_len` into instruction + instance (the teacher reads both,
    `enc_len` tokens: what the other variants read); the decoder reads `dec_len` tokens."""
    vocab: int
    d_model: int
    d_kv: int
    heads: int
    d_ff: int
    layers: int
    buckets: int
    max_distance: int
    batch: int
    enc_len: int
    dec_len: int
    instruction_len: int
    rank: int
    hyper_hidden: int
    hyper_embed: int
    head_dim: int
    tasks: int

    def describe(self) -> str:
        return (f"T5 v1.1 (random) d_model={self.d_model} d_ff={self.d_ff} heads={self.heads}x{self.d_kv} "
                f"layers={self.layers}+{self.layers} vocab={self.vocab}, float32; batch {self.batch}, encoder "
                f"{self.enc_len} (TAGI: instruction {self.instruction_len} + instance "
                f"{self.enc_len - self.instruction_len}), decoder {self.dec_len}; LoRA rank {self.rank} on q,v")


# T5 v1.1 small (d_ff 1024, 6 heads of 64) with 4+4 layers; the hypernetwork's package defaults (512 / 128).
ISSUE = Shapes(vocab=32128, d_model=512, d_kv=64, heads=6, d_ff=1024, layers=4, buckets=32, max_distance=128,
               batch=8, enc_len=256, dec_len=64, instruction_len=192, rank=32, hyper_hidden=512, hyper_embed=128,
               head_dim=8, tasks=4)
TINY = Shapes(vocab=300, d_model=32, d_kv=8, heads=4, d_ff=64, layers=2, buckets=8, max_distance=20, batch=2,
              enc_len=24, dec_len=8, instruction_len=16, rank=4, hyper_hidden=16, hyper_embed=8, head_dim=4, tasks=2)


def t5_config(s: Shapes) -> T5Config:
    return T5Config(vocab_size=s.vocab, d_model=s.d_model, d_kv=s.d_kv, d_ff=s.d_ff, num_heads=s.heads,
                    num_encoder_layers=s.layers, num_decoder_layers=s.layers, relative_attention_num_buckets=s.buckets,
                    relative_attention_max_distance=s.max_distance, dropout_rate=0.0)


def tagi_config(s: Shapes, head: str, num_teachers: int) -> tagi_lib.TAGIConfig:
    hyper = HyperNetConfig(adapter_targets=TARGETS, rank=s.rank, lora_alpha=LORA_ALPHA, hidden_dim=s.hyper_hidden,
                           embed_dim=s.hyper_embed, dropout_rate=0.0, head=head, head_dim=s.head_dim)
    return tagi_lib.TAGIConfig(t5=t5_config(s), hypernet=hyper, fusion="prepend", num_teachers=num_teachers,
                               teacher_rank=s.rank, teacher_alpha=LORA_ALPHA)


def make_batch(s: Shapes, seed: int) -> dict[str, np.ndarray]:
    """Right-padded random tokens (EOS-terminated, lengths spread over the batch), every model feature."""
    rng = np.random.RandomState(seed)
    instance_len = s.enc_len - s.instruction_len

    def rows(length, minimum):
        out = np.zeros((s.batch, length), np.int32)
        for i in range(s.batch):
            n = length - (i * (length - minimum)) // max(s.batch - 1, 1)
            out[i, : n - 1], out[i, n - 1] = rng.randint(3, s.vocab, n - 1), 1
        return out

    hyper, instance = rows(s.instruction_len, 2), rows(instance_len, 2)
    full = np.zeros((s.batch, s.enc_len), np.int32)
    for i in range(s.batch):
        joined = np.concatenate([hyper[i][hyper[i] > 1], instance[i][instance[i] > 0]])
        full[i, : len(joined)] = joined
    targets = rows(s.dec_len, 2)[::-1].copy()
    inputs = np.zeros_like(targets)
    inputs[:, 1:] = targets[:, :-1]
    return {FEAT.ENCODER_INPUT_TOKENS: instance, FEAT.HYPER_ENCODER_INPUT_TOKENS: hyper,
            FEAT.FULL_ENCODER_INPUT_TOKENS: full, FEAT.DECODER_INPUT_TOKENS: inputs,
            FEAT.DECODER_TARGET_TOKENS: targets, FEAT.DECODER_LOSS_WEIGHTS: (targets > 0).astype(np.float32),
            FEAT.TASK_ID: (np.arange(s.batch) % s.tasks).astype(np.int32)}


def perturb_b_factors(tree, seed: int, std: float = 0.02):
    """Every all-zero leaf whose name starts with "B" (B heads and biases, teacher B rows): N(0, std²/fan_in)
    instead, so that generated and teacher updates are non-zero and the parity check covers them."""
    rng = np.random.RandomState(seed)

    def perturb(path, x):
        x, name = np.asarray(x), optim.path_to_str(path).rsplit("/", 1)[-1]
        if not name.startswith("B") or np.any(x):
            return x
        fan_in = x.shape[-3] if name in ("B_kernel", "B_basis") else 1  # hidden width / head_dim
        return (rng.randn(*x.shape) * std / np.sqrt(fan_in)).astype(np.float32)
    return jax.tree_util.tree_map_with_path(perturb, tree)


# --------------------------------------------------------------------------------------------- the two sides
class JaxStep:
    """The package's `train_step` compiled ahead of time, as the trainer jits it (state donated; `donate=False`
    for bench/speed_levers.py's comparison)."""

    def __init__(self, loss_fn, params, frozen, batch, settings, donate: bool = True):
        opt_cfg = optim.default_config()
        opt_cfg.learning_rate = settings.learning_rate
        labels = optim.parameter_labels(params, frozen)
        self.loss_fn, self.trainable = loss_fn, optim.trainable_mask(labels)
        self.tx, schedule = optim.make_optimizer(opt_cfg, labels, total_steps=1000)
        step = functools.partial(steps.train_step, loss_fn=loss_fn, tx=self.tx, trainable=self.trainable,
                                 schedule=schedule)
        self.state = jax.jit(lambda p: TrainState.create(p, self.tx))(params)
        self.batch = {k: jnp.asarray(v) for k, v in batch.items()}
        self.rng = jax.random.key(settings.seed)
        self.compiled = jax.jit(step, donate_argnums=(0,) if donate else ()).lower(
            self.state, self.batch, self.rng).compile()
        self.last_loss = float("nan")

    def __call__(self):
        self.state, metrics = self.compiled(self.state, self.batch, self.rng)
        self.last_loss = metrics["loss"]
        return self.state, metrics

    def parts(self) -> dict[str, Callable[[], Any]]:
        """The step's parts, each compiled alone on the current state (the step must not run afterwards: it
        donates that state): the loss, `compute_gradients` (forward + backward) and `apply_gradients`."""
        state, batch, rng = self.state, self.batch, self.rng
        aot = lambda fn, *args: jax.jit(fn).lower(*args).compile()  # noqa: E731
        forward = aot(lambda p, b, r: self.loss_fn(p, b, r)[0], state.params, batch, rng)
        gradients = aot(functools.partial(steps.compute_gradients, loss_fn=self.loss_fn, trainable=self.trainable),
                        state.params, batch, rng)
        grads, _ = gradients(state.params, batch, rng)
        update = aot(lambda s, g: s.apply_gradients(g, self.tx, self.trainable), state, grads)
        return {"forward": lambda: forward(state.params, batch, rng),
                "forward+backward": lambda: gradients(state.params, batch, rng),
                "update": lambda: update(state, grads)}


class TorchSide:
    """A `TorchStep` that remembers the loss of its last call (the loss *before* that call's update)."""

    def __init__(self, step):
        self.step, self.last_loss = step, float("nan")

    def __call__(self):
        self.last_loss = self.step()

    def parts(self) -> dict[str, Callable[[], Any]]:
        """forward (no autograd graph, like our loss alone), forward+backward, update (clipping + AdamW on the
        gradients the last backward left)."""
        import torch

        step = self.step

        def forward():
            with torch.no_grad():
                step.loss_fn()

        def forward_backward():
            step.optimizer.zero_grad(set_to_none=True)
            step.loss_fn().backward()

        def update():
            torch.nn.utils.clip_grad_norm_(step.params, step.clip_norm)
            step.optimizer.step()

        forward_backward()
        return {"forward": forward, "forward+backward": forward_backward, "update": update}


@dataclasses.dataclass
class Pair:
    """One variant's two steps and, for tests, its parameters side by side: `param_pairs()` -> [(name, ours,
    torch's)] (numpy)."""
    name: str
    jax_step: JaxStep
    torch_step: TorchSide
    param_pairs: Callable[[], list]


def torch_modules(settings):
    import torch

    from bench import _torch_tagi as T

    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    return torch, T


def _torch_side(T, loss_fn, params, settings) -> TorchSide:
    if settings.torch_compile:
        import torch

        loss_fn = torch.compile(loss_fn)
    return TorchSide(T.TorchStep(loss_fn, params, learning_rate=settings.learning_rate, clip_norm=1.0))


@functools.lru_cache(maxsize=2)
def init_t5(cfg: T5Config, seed: int) -> dict:
    """Our T5's initial weights (numpy; shared by the variants: treat as read-only)."""
    return jax.tree.map(np.asarray, jax.jit(lambda rng: t5_init_params(cfg, rng))(jax.random.key(seed)))


def finetune_params(model_cfg: tagi_lib.TAGIConfig, seed: int) -> dict:
    """The `finetune` stage's {"student", "teacher"} tree, initialised part by part (a jitted init of the whole
    tree compiles two TAGI forwards: half a minute on 2 cores even at --tiny); checked against the stage's own
    tree structure and shapes. As in `stage_init_fn`, both halves hold the same backbone and hypernetwork."""
    t5_cfg, key = model_cfg.t5, jax.random.key(seed + 3)
    hypernet = HyperNetwork(model_cfg.hypernet, t5_cfg)
    table = TeacherTable(t5_cfg, model_cfg.adapter_targets, model_cfg.num_teachers, model_cfg.teacher_rank,
                         model_cfg.teacher_alpha)
    init = jax.jit(lambda rng: nn.meta.unbox({
        "hypernet": hypernet.init(rng, jnp.zeros((1, t5_cfg.d_model)))["params"],
        "teachers": table.init(rng, jnp.zeros((1,), jnp.int32))["params"]}))
    parts = jax.tree.map(np.asarray, init(key))
    t5 = init_t5(t5_cfg, seed)
    tree = {"student": {"t5": t5, "hypernet": parts["hypernet"]},
            "teacher": {"t5": t5, "hypernet": parts["hypernet"], "teachers": parts["teachers"]}}
    expected = jax.eval_shape(lambda r: nn.meta.unbox(stages.stage_init_fn("finetune", model_cfg)(r)), key)
    if C.shape_key(expected) != C.shape_key(tree):
        raise AssertionError("finetune_params: the tree differs from stages.stage_init_fn('finetune')")
    return tree


def _hf_pairs(T, cfg, ours_t5, torch_model, prefix: str) -> list:
    theirs = T.hf_state_dict(torch_model)
    return [(f"{prefix}{k}", v, theirs[k]) for k, v in to_hf_state_dict(cfg, ours_t5).items()]


def build_full_finetune(s: Shapes, settings, batch) -> Pair:
    torch, T = torch_modules(settings)
    cfg = t5_config(s)
    t5 = init_t5(cfg, settings.seed)
    model = tagi_lib.TAGI(tagi_config(s, settings.head, 0))
    ours = JaxStep(objectives.make_loss_fn("concat", defaults.default_config(), model, None), {"t5": t5}, (),
                   batch, settings)
    hf, tb = T.hf_t5(cfg, t5), T.torch_batch(batch)
    loss = lambda: T.token_cross_entropy(  # noqa: E731
        T.hf_logits(hf, tb[FEAT.FULL_ENCODER_INPUT_TOKENS], tb), tb[FEAT.DECODER_TARGET_TOKENS],
        tb[FEAT.DECODER_LOSS_WEIGHTS])
    return Pair("full_finetune", ours, _torch_side(T, loss, hf.parameters(), settings),
                lambda: _hf_pairs(T, cfg, ours.state.params["t5"], hf, "t5/"))


def build_lora(s: Shapes, settings, batch) -> Pair:
    torch, T = torch_modules(settings)
    import peft

    cfg = t5_config(s)
    t5 = init_t5(cfg, settings.seed)
    init = lora.init_adapters(jax.random.key(settings.seed + 1), cfg, TARGETS, s.rank, alpha=LORA_ALPHA)
    table = perturb_b_factors({t: {"A": np.asarray(e["A"])[None], "B": np.asarray(e["B"])[None]}
                               for t, e in init.items()}, settings.seed + 2)
    model = tagi_lib.TAGI(tagi_config(s, settings.head, 1))
    lora_batch = dict(batch, **{FEAT.TASK_ID: np.zeros(s.batch, np.int32)})
    ours = JaxStep(objectives.make_loss_fn("teachers", defaults.default_config(), model, None),
                   {"t5": t5, "teachers": table}, stages.frozen_patterns("teachers"), lora_batch, settings)
    hf = peft.get_peft_model(T.hf_t5(cfg, t5), peft.LoraConfig(r=s.rank, lora_alpha=LORA_ALPHA, lora_dropout=0.0,
                                                              target_modules=["q", "v"]))
    modules = {}
    with torch.no_grad():
        for target in TARGETS:
            for layer in range(s.layers):
                m = modules[(target, layer)] = hf.base_model.model.get_submodule(hf_module_name(target, layer))
                m.lora_A["default"].weight.copy_(T.tensor(table[target]["A"][0, layer].T))
                m.lora_B["default"].weight.copy_(T.tensor(table[target]["B"][0, layer].T))
    tb = T.torch_batch(lora_batch)
    loss = lambda: T.token_cross_entropy(  # noqa: E731
        T.hf_logits(hf, tb[FEAT.FULL_ENCODER_INPUT_TOKENS], tb), tb[FEAT.DECODER_TARGET_TOKENS],
        tb[FEAT.DECODER_LOSS_WEIGHTS])

    def pairs():
        got = ours.state.params["teachers"]
        return [(f"teachers/{t}/{f}/{layer}", np.asarray(got[t][f][0, layer]),
                 getattr(modules[(t, layer)], f"lora_{f}")["default"].weight.detach().numpy().T)
                for t in TARGETS for f in ("A", "B") for layer in range(s.layers)]
    return Pair("lora", ours, _torch_side(T, loss, hf.parameters(), settings), pairs)


def perturbed_finetune_params(model_cfg: tagi_lib.TAGIConfig, seed: int) -> dict:
    """`finetune_params` with the student's generator B heads and the teachers' B rows perturbed (so the
    generated and teacher updates are non-zero): the TAGI step's weights in bench/train_step.py and
    bench/speed_levers.py."""
    params = finetune_params(model_cfg, seed)
    params["student"]["hypernet"] = perturb_b_factors(params["student"]["hypernet"], seed + 1)
    params["teacher"]["teachers"] = perturb_b_factors(params["teacher"]["teachers"], seed + 2)
    return params


def build_tagi(s: Shapes, settings, batch) -> Pair:
    torch, T = torch_modules(settings)
    model_cfg = tagi_config(s, settings.head, s.tasks)
    params = perturbed_finetune_params(model_cfg, settings.seed)
    run_cfg = defaults.default_config()
    loss_fn = objectives.make_loss_fn("finetune", run_cfg, tagi_lib.TAGI(model_cfg), np.arange(s.tasks))
    ours = JaxStep(loss_fn, params, stages.frozen_patterns("finetune", "all"), batch, settings)
    torch_tagi, tb = T.TorchTAGI(model_cfg, params, lambda_kl=run_cfg.loss.lambda_kl), T.torch_batch(batch)

    def pairs():
        got = ours.state.params["student"]
        hyper = jax.tree_util.tree_flatten_with_path(got["hypernet"])[0]
        theirs = jax.tree_util.tree_flatten_with_path(torch_tagi.hypernet.flax_params())[0]
        return _hf_pairs(T, model_cfg.t5, got["t5"], torch_tagi.student, "student/t5/") + [
            ("student/hypernet/" + optim.path_to_str(p), np.asarray(v), w) for (p, v), (_, w) in zip(hyper, theirs)]
    return Pair("tagi", ours, _torch_side(T, lambda: torch_tagi.loss(tb), torch_tagi.trainable(), settings), pairs)


BUILDERS = {"full_finetune": build_full_finetune, "lora": build_lora, "tagi": build_tagi}


def build(name: str, settings) -> Pair:
    return BUILDERS[name](settings.shapes, settings, make_batch(settings.shapes, settings.seed))
