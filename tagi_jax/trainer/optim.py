"""Optimizers, learning-rate schedules, and parameter labels (from path patterns) for freezing and
learning-rate groups, all driving one `optax.multi_transform`."""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import optax
from ml_collections import config_dict

from tagi_jax.config import ConfigError, require_choice, require_int, require_number, require_regex

OPTIMIZERS = ("adamw", "adafactor")
SCHEDULES = ("constant", "linear", "rsqrt", "cosine")
FROZEN = "frozen"
DEFAULT = "default"


def default_config() -> config_dict.ConfigDict:
    """The `config.optimizer` section with its defaults:

        name: "adamw" | "adafactor"
        learning_rate: 1e-3          # peak learning rate, reached at the end of warmup
        warmup_steps: 0              # linear warmup from 0 (HF convention: lr(step) = lr * step / warmup_steps)
        schedule: "constant" | "linear" | "rsqrt" | "cosine"   # decay after warmup (`learning_rate_schedule`)
        decay_steps: 0               # where linear/cosine decay reaches 0; 0 means train.steps
        weight_decay: 0.0            # decoupled (AdamW / Adafactor weight_decay_rate), times the learning rate
        weight_decay_exclude: ()     # regexes of parameter paths that are not decayed, e.g. ("norm", "bias$")
        clip_norm: 1.0               # global-norm clipping of the (trainable) gradient; 0 disables it
        frozen: ()                   # regexes (re.search on the path); matching parameters are not updated
        groups: {}                   # name -> {pattern: regex, lr_scale: float}; learning rate x lr_scale
        adamw: {b1: 0.9, b2: 0.999, eps: 1e-8}
        adafactor: {decay_rate: 0.8, clipping_threshold: 1.0, multiply_by_parameter_scale: True,
                    factored: True, min_dim_size_to_factor: 128}

    Example: stage 2 with a frozen backbone and a faster hypernetwork:

        config.optimizer.frozen = ("^t5/",)
        config.optimizer.groups = {"hypernet": {"pattern": "^hypernet/", "lr_scale": 10.0}}
    """
    return config_dict.ConfigDict(
        {
            "name": "adamw",
            "learning_rate": 1e-3,
            "warmup_steps": 0,
            "schedule": "constant",
            "decay_steps": 0,
            "weight_decay": 0.0,
            "weight_decay_exclude": (),
            "clip_norm": 1.0,
            "frozen": (),
            "groups": config_dict.ConfigDict(),
            "adamw": {"b1": 0.9, "b2": 0.999, "eps": 1e-8},
            "adafactor": {
                "decay_rate": 0.8,
                "clipping_threshold": 1.0,
                "multiply_by_parameter_scale": True,
                "factored": True,
                "min_dim_size_to_factor": 128,
            },
        }
    )


# --------------------------------------------------------------------------------------------------
# Schedules
# --------------------------------------------------------------------------------------------------


def learning_rate_schedule(
    name: str, learning_rate: float, warmup_steps: int, decay_steps: int
) -> optax.Schedule:
    """Linear warmup from 0 to `learning_rate` over `warmup_steps`, then:

    - constant: `learning_rate`;
    - linear:   down to 0 at `decay_steps` (HF `get_linear_schedule_with_warmup`, the paper's choice);
    - rsqrt:    `learning_rate * sqrt(w / step)` with `w = max(warmup_steps, 1)`, i.e. T5X's rsqrt decay
                normalised to equal `learning_rate` at the end of warmup;
    - cosine:   half a cosine down to 0 at `decay_steps`.

    `step` is the number of updates already applied (optax's count), so the first update uses lr(0).
    """
    if name not in SCHEDULES:
        raise ConfigError(f"config key 'optimizer.schedule' is {name!r}; choose one of: {', '.join(SCHEDULES)}")
    lr = float(learning_rate)
    warmup = int(warmup_steps)
    decay = int(decay_steps)
    timescale = float(max(warmup, 1))

    def schedule(count):
        step = jnp.asarray(count, jnp.float32)
        warm = lr * step / max(warmup, 1)
        if name == "constant":
            after = jnp.full_like(step, lr)
        elif name == "linear":
            after = lr * jnp.clip((decay - step) / max(decay - warmup, 1), 0.0, 1.0)
        elif name == "rsqrt":
            after = lr * jnp.sqrt(timescale / jnp.maximum(step, timescale))
        else:  # cosine
            progress = jnp.clip((step - warmup) / max(decay - warmup, 1), 0.0, 1.0)
            after = lr * 0.5 * (1.0 + jnp.cos(math.pi * progress))
        return jnp.where(step < warmup, warm, after)

    return schedule


def make_schedule(opt_cfg: config_dict.ConfigDict, total_steps: int) -> optax.Schedule:
    decay_steps = int(opt_cfg.get("decay_steps", 0) or 0) or int(total_steps)
    return learning_rate_schedule(
        opt_cfg.schedule, opt_cfg.learning_rate, opt_cfg.warmup_steps, decay_steps
    )


# --------------------------------------------------------------------------------------------------
# Parameter labels
# --------------------------------------------------------------------------------------------------


def path_to_str(path: Sequence[Any]) -> str:
    """A jax key path -> "a/b/c" (dict keys, attribute names and sequence indices joined by "/")."""
    parts = []
    for entry in path:
        for attr in ("key", "name", "idx"):
            if hasattr(entry, attr):
                parts.append(str(getattr(entry, attr)))
                break
        else:
            parts.append(str(entry))
    return "/".join(parts)


def parameter_paths(params: Any) -> list[str]:
    return [path_to_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]


def _groups_dict(groups: Any) -> dict[str, Mapping[str, Any]]:
    if groups is None:
        return {}
    if isinstance(groups, config_dict.ConfigDict):
        return {k: groups[k] for k in groups.keys()}
    return dict(groups)


def parameter_labels(
    params: Any,
    frozen: Sequence[str] = (),
    groups: Mapping[str, Mapping[str, Any]] | None = None,
    prefix: str = "optimizer",
) -> Any:
    """A tree like `params` of labels: "frozen", a group name, or "default".

    Every parameter gets its label from its path (`"encoder/layers_0/attention/query/kernel"`, the tree's dict
    keys joined by "/"): frozen parameters get `optax.set_to_zero()` and no optimizer state (which matters when
    the frozen part is an 11B backbone), each group the base optimizer with its learning rate scaled.
    Precedence: `frozen` wins over groups; a parameter matched by two groups, a pattern matching no parameter,
    and a group named "default" or "frozen" are errors (they are almost always typos).

    Works on abstract params (only paths matter). Errors name the config key: a pattern that matches no
    parameter, or a parameter claimed by two groups.
    """
    frozen_res = [(f"{prefix}.frozen[{i}]", require_regex(f"{prefix}.frozen[{i}]", p)) for i, p in enumerate(frozen)]
    group_res = []
    for name, spec in _groups_dict(groups).items():
        if name in (FROZEN, DEFAULT):
            raise ConfigError(f"config key '{prefix}.groups.{name}': the group names 'frozen' and 'default' are reserved")
        group_res.append((name, f"{prefix}.groups.{name}.pattern", require_regex(f"{prefix}.groups.{name}.pattern", spec.get("pattern"))))
    used: set[str] = set()

    def label(path, _):
        s = path_to_str(path)
        frozen_hits = [key for key, rx in frozen_res if rx.search(s)]
        if frozen_hits:
            used.update(frozen_hits)
            return FROZEN
        hits = [(name, key) for name, key, rx in group_res if rx.search(s)]
        if len(hits) > 1:
            raise ConfigError(
                f"config keys '{hits[0][1]}' and '{hits[1][1]}' both match parameter '{s}'; make the patterns disjoint"
            )
        if hits:
            used.add(hits[0][1])
            return hits[0][0]
        return DEFAULT

    labels = jax.tree_util.tree_map_with_path(label, params)
    for key in [k for k, _ in frozen_res] + [k for _, k, _ in group_res]:
        if key not in used:
            note = "" if ".frozen[" in key else " that is not frozen"
            raise ConfigError(
                f"config key '{key}' matches no parameter{note} (paths look like '{parameter_paths(params)[0]}')"
            )
    return labels


def trainable_mask(labels: Any) -> Any:
    """True for parameters that are updated (label is not "frozen")."""
    return jax.tree.map(lambda label: label != FROZEN, labels)


def _path_mask(patterns: Sequence[str], key: str) -> Callable[[Any], Any] | None:
    """A weight-decay mask callable: True where no `patterns` regex matches the parameter path."""
    if not patterns:
        return None
    compiled = [require_regex(f"{key}[{i}]", p) for i, p in enumerate(patterns)]

    def mask(params):
        return jax.tree_util.tree_map_with_path(
            lambda path, _: not any(rx.search(path_to_str(path)) for rx in compiled), params
        )

    return mask


# --------------------------------------------------------------------------------------------------
# The optimizer
# --------------------------------------------------------------------------------------------------


def base_optimizer(opt_cfg: config_dict.ConfigDict, learning_rate: optax.Schedule) -> optax.GradientTransformation:
    """AdamW or Adafactor at the given schedule, with decoupled weight decay."""
    decay_mask = _path_mask(tuple(opt_cfg.get("weight_decay_exclude", ()) or ()), "optimizer.weight_decay_exclude")
    wd = float(opt_cfg.weight_decay)
    if opt_cfg.name == "adamw":
        a = opt_cfg.adamw
        return optax.adamw(learning_rate, b1=a.b1, b2=a.b2, eps=a.eps, weight_decay=wd, mask=decay_mask)
    if opt_cfg.name == "adafactor":
        a = opt_cfg.adafactor
        return optax.adafactor(
            learning_rate,
            min_dim_size_to_factor=a.min_dim_size_to_factor,
            decay_rate=a.decay_rate,
            multiply_by_parameter_scale=a.multiply_by_parameter_scale,
            clipping_threshold=a.clipping_threshold,
            factored=a.factored,
            weight_decay_rate=wd or None,
            weight_decay_mask=decay_mask,
        )
    raise ConfigError(f"config key 'optimizer.name' is {opt_cfg.name!r}; choose one of: {', '.join(OPTIMIZERS)}")


def make_optimizer(
    opt_cfg: config_dict.ConfigDict, labels: Any, total_steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(transformation, base schedule) for `labels` (from `parameter_labels`).

    Chain: zero the frozen gradients -> clip by the global norm (so the norm is that of the trainable
    gradient) -> per-label optimizer (`multi_transform`): frozen -> set_to_zero, default -> base
    optimizer, group -> base optimizer at `lr_scale` x the schedule.
    """
    schedule = make_schedule(opt_cfg, total_steps)
    groups = _groups_dict(opt_cfg.get("groups"))
    present = set(jax.tree.leaves(labels))
    transforms: dict[str, optax.GradientTransformation] = {FROZEN: optax.set_to_zero()}
    transforms[DEFAULT] = base_optimizer(opt_cfg, schedule)
    for name, spec in groups.items():
        scale = float(spec.get("lr_scale", 1.0))
        transforms[name] = base_optimizer(opt_cfg, _scaled(schedule, scale))
    transforms = {k: v for k, v in transforms.items() if k in present or k == DEFAULT}
    frozen = jax.tree.map(lambda label: label == FROZEN, labels)
    chain = [optax.masked(optax.set_to_zero(), frozen)]
    if opt_cfg.clip_norm and opt_cfg.clip_norm > 0:
        chain.append(optax.clip_by_global_norm(float(opt_cfg.clip_norm)))
    chain.append(optax.multi_transform(transforms, labels))
    return optax.chain(*chain), schedule


def _scaled(schedule: optax.Schedule, scale: float) -> optax.Schedule:
    return lambda count: scale * schedule(count)


def validate_config(opt_cfg: config_dict.ConfigDict, total_steps: int, prefix: str = "optimizer") -> None:
    """Name/range checks of the optimizer section (patterns are checked against parameters later)."""
    if not isinstance(opt_cfg, config_dict.ConfigDict):
        raise ConfigError(f"config key '{prefix}' must be a section")
    wrapped = config_dict.ConfigDict({prefix: opt_cfg})
    require_choice(wrapped, f"{prefix}.name", OPTIMIZERS)
    require_choice(wrapped, f"{prefix}.schedule", SCHEDULES)
    require_number(wrapped, f"{prefix}.learning_rate", 0.0, strict=True)
    warmup = require_int(wrapped, f"{prefix}.warmup_steps", 0)
    decay = require_int(wrapped, f"{prefix}.decay_steps", 0) or total_steps
    require_number(wrapped, f"{prefix}.weight_decay", 0.0)
    require_number(wrapped, f"{prefix}.clip_norm", 0.0)
    if opt_cfg.schedule in ("linear", "cosine") and decay <= warmup:
        raise ConfigError(
            f"config key '{prefix}.warmup_steps'={warmup} leaves no room for the {opt_cfg.schedule} decay, "
            f"which ends at step {decay} ({prefix}.decay_steps or train.steps)"
        )
    for i, pattern in enumerate(opt_cfg.get("frozen", ()) or ()):
        require_regex(f"{prefix}.frozen[{i}]", pattern)
    for i, pattern in enumerate(opt_cfg.get("weight_decay_exclude", ()) or ()):
        require_regex(f"{prefix}.weight_decay_exclude[{i}]", pattern)
    for name, spec in _groups_dict(opt_cfg.get("groups")).items():
        if name in (FROZEN, DEFAULT):
            raise ConfigError(f"config key '{prefix}.groups.{name}': the group names 'frozen' and 'default' are reserved")
        if not hasattr(spec, "get") or "pattern" not in spec:
            raise ConfigError(f"config key '{prefix}.groups.{name}.pattern' is required")
        require_regex(f"{prefix}.groups.{name}.pattern", spec["pattern"])
        unknown = set(spec.keys()) - {"pattern", "lr_scale"}
        if unknown:
            raise ConfigError(f"unknown config key '{prefix}.groups.{name}.{sorted(unknown)[0]}' (known: pattern, lr_scale)")
        scale = spec.get("lr_scale", 1.0)
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or scale <= 0:
            raise ConfigError(f"config key '{prefix}.groups.{name}.lr_scale' must be a number > 0, got {scale!r}")
