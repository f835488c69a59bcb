"""A small Python API for notebooks and scripts: load a trained work directory, turn an instruction into an
adapter once, then predict or score as many inputs as you like with it; save/load adapters as PEFT dirs.

    from tagi_jax.api import TAGIPredictor

    p = TAGIPredictor.load("runs/demo")                    # method="tagi" by default
    adapter = p.generate_adapter("Sort the numbers in increasing order.",
                                 examples=[{"input": "3 1 2", "output": "1 2 3"}])
    p.predict(["5 4 9", "2 8 1"], adapter)                 # -> ["4 5 9", "1 2 8"]
    p.score(["5 4 9"], [["4 5 9", "9 5 4"]], adapter)      # token-averaged log-likelihood per choice
    p.save_adapter("sort_adapter", adapter)                 # PEFT directory (adapter_config.json + safetensors)
    adapter = p.load_adapter("sort_adapter")

Text is formatted exactly as in training (Tk-Instruct, `tasks.formatting.tk_instruct_texts`): the instruction becomes
"Definition: ...\\n\\n" plus " Positive Example k -\\n..." blocks, and each input becomes "Now complete the
following example -\\nInput: ...\\nOutput: " (pass `raw=True` / `format_inputs=False` for pre-formatted text).
Baselines load the same way: "concat" reads the instruction with every input (the `TaskAdapter` then only
carries the instruction text), "no_instruction" ignores it.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Mapping, Sequence

import jax
import numpy as np
from flax import traverse_util

from tagi_jax import export, hf
from tagi_jax import features as F
from tagi_jax.data.batches import task_lengths
from tagi_jax.eval.adapters import AdapterCache, AdapterTable, generate_task_adapters
from tagi_jax.eval.decode import decode_tokens, detokenize, score_tokens, shift_right, tokenize
from tagi_jax.models import lora
from tagi_jax.run.stages import check_method
from tagi_jax.run.workdir import load_trained
from tagi_jax.vocab import get_vocabulary
from tasks.formatting import tk_instruct_texts


@dataclasses.dataclass
class TaskAdapter:
    """One task's generated adapter: LoRA factors without a batch axis ([layers, d_in, r] / [layers, r, d_out]),
    the encoded instruction for fusion models (states [n, d_model], mask [n]) and the instruction text."""

    instruction: str
    adapters: dict | None = None
    states: np.ndarray | None = None
    mask: np.ndarray | None = None
    source: str = "generated"

    def table_tree(self) -> dict | None:
        """A one-row adapter table (what the compiled decoding functions take)."""
        if self.adapters is None:
            return None
        table = AdapterTable(
            adapters={t: {"A": np.asarray(e["A"])[None], "B": np.asarray(e["B"])[None],
                          "scale": np.float32(np.asarray(e.get("scale", 1.0)))} for t, e in self.adapters.items()},
            states=None if self.states is None else np.asarray(self.states)[None],
            mask=None if self.mask is None else np.asarray(self.mask)[None],
            index={self.instruction: 0})
        return table.device_tree()


def format_instruction(definition: str, examples: Sequence[Mapping[str, str]] | None = None) -> str:
    """Tk-Instruct instruction text (what the hypernetwork reads): definition + positive examples."""
    task = {"Definition": [definition], "Positive Examples": list(examples or [])}
    return tk_instruct_texts(task, "", num_pos=len(task["Positive Examples"]), num_neg=0)[F.HYPER_INPUTS]


def format_input(instance_input: str) -> str:
    """Tk-Instruct instance text (what the model with the generated adapter reads)."""
    return tk_instruct_texts({"Definition": [""]}, instance_input, num_pos=0, num_neg=0,
                                 add_task_definition=False)[F.INPUTS]


def _check_examples(examples) -> list[dict]:
    out = []
    for i, ex in enumerate(examples or []):
        if not isinstance(ex, Mapping) or "input" not in ex or "output" not in ex:
            raise ValueError(f"examples[{i}]: expected a dict with 'input' and 'output', got {ex!r}")
        out.append({"input": str(ex["input"]), "output": str(ex["output"])})
    return out


class TAGIPredictor:
    """A trained model (one method of a pipeline work directory) ready for inference."""

    def __init__(self, config, model, params, method: str, vocab, lengths: Mapping[str, int], *,
                 batch_size: int = 32, max_decode_len: int = 128, workdir: str | None = None,
                 cache: AdapterCache | None = None):
        self.config = config
        self.model = model
        self.params = params
        check_method(method)
        self.method = method
        self.vocab = vocab
        self.lengths = {k: int(v) for k, v in lengths.items()}
        self.batch_size = int(batch_size)
        self.max_decode_len = int(max_decode_len)
        self.workdir = workdir
        self.cache = cache if cache is not None else AdapterCache()
        self.adapter: TaskAdapter | None = None  # the last generated or loaded adapter

    # ------------------------------------------------------------------------------------------------ loading
    @classmethod
    def load(cls, workdir: str, method: str = "tagi", *, cache_dir: str | None = None) -> "TAGIPredictor":
        """Load `method`'s trained parameters from a pipeline work directory (`launch/train.py --workdir`).

        `cache_dir` (default `<workdir>/adapter_cache`; "" for memory only) keeps generated adapters on disk.
        """
        check_method(method)
        if not os.path.isdir(workdir):
            raise FileNotFoundError(f"{workdir}: work directory not found")
        config, model, params = load_trained(workdir, method)
        vocab = get_vocabulary(config.data.vocabulary, workdir)
        cache_dir = os.path.join(workdir, "adapter_cache") if cache_dir is None else cache_dir
        return cls(config, model, params, method, vocab, task_lengths(config.data),
                   batch_size=int(config.eval.batch_size), max_decode_len=int(config.eval.max_decode_len),
                   workdir=workdir, cache=AdapterCache(cache_dir or None))

    @property
    def uses_adapters(self) -> bool:
        return check_method(self.method).generates_adapters

    @property
    def fusion(self) -> str:
        """The model's instruction fusion ("prepend", "encoder_cross_attention" or "none")."""
        return getattr(self.model.config, "fusion", "none")

    @property
    def uses_fusion(self) -> bool:
        """Whether adapters of this method carry the encoded instruction the model also reads."""
        return self.uses_adapters and self.fusion != "none"

    # ------------------------------------------------------------------------------------------------ adapters
    def generate_adapter(self, instruction: str, examples: Sequence[Mapping[str, str]] | None = None, *,
                         raw: bool = False) -> TaskAdapter:
        """The adapter for a task described by `instruction` (its definition) and optional positive
        `examples` ([{"input", "output"}]), formatted as in training unless `raw`. One hypernetwork call; no
        gradient step. Becomes the default adapter of `predict` / `score` / `save_adapter`."""
        if not isinstance(instruction, str) or not instruction.strip():
            raise ValueError("generate_adapter: the instruction is empty; describe the task (its definition)")
        text = instruction if raw else format_instruction(instruction, _check_examples(examples))
        if not self.uses_adapters:
            self.adapter = TaskAdapter(text, source=f"instruction for method {self.method!r} (no adapter)")
            return self.adapter
        table = generate_task_adapters(self.model, self.params, [text], self.vocab,
                                                  self.lengths[F.HYPER_INPUTS], 1, self.cache)
        adapters = table.adapter(text)
        states = mask = None
        if table.states is not None:
            states, mask = table.states[0], table.mask[0]
        self.adapter = TaskAdapter(text, adapters, states, mask)
        return self.adapter

    def save_adapter(self, path: str, adapter: TaskAdapter | None = None, *, allow_fusion_loss: bool = False,
                     base_model_name_or_path: str | None = None) -> str:
        """Write `adapter` (default: the last one) as a PEFT LoRA directory for the backbone's HF T5.

        A fusion model's adapter cannot be represented by PEFT: this raises unless `allow_fusion_loss` (the
        encoded instruction is then saved beside it, so `load_adapter` here restores it exactly).

        The adapter reproduces the student only on the student's own backbone. When that backbone is the
        imported checkpoint's (`tagi.train_backbone = "none"` from a checkpoint), `base_model_name_or_path`
        defaults to the checkpoint; when training moved it (or there was no checkpoint), the trained backbone
        is written to `<path>/backbone` and becomes the base (an explicit `base_model_name_or_path` is then an
        error: PEFT would apply the adapter to a model it was not generated for)."""
        adapter = self._adapter(adapter, "save_adapter")
        if self.uses_fusion:
            export.check_fusion(True, allow_fusion_loss, self.fusion)  # before anything is written
        trained = self._trained_backbone()
        base = base_model_name_or_path
        if trained is not None and base is not None:
            raise ValueError(f"save_adapter: base_model_name_or_path={base!r}, but the student's backbone is not that "
                             "checkpoint's (it was trained); the trained backbone is written beside the adapter "
                             "instead: leave base_model_name_or_path unset")
        if base is None and trained is None:
            base = str(self.config.model.get("checkpoint", "")) or None
        return export.export_peft_adapter(
            adapter.adapters, path, self.model.config.t5, base_model_name_or_path=base,
            uses_fusion=self.uses_fusion, allow_fusion_loss=allow_fusion_loss, fusion=self.fusion,
            metadata={"instruction": adapter.instruction, "method": self.method, "workdir": self.workdir,
                      "checkpoint_fingerprint": self.cache.fingerprint(self.params, self.model)},
            instruction_states=adapter.states if self.uses_fusion else None,
            instruction_mask=adapter.mask if self.uses_fusion else None, backbone_params=trained)

    def _trained_backbone(self):
        """The student's backbone parameters (host numpy) unless they equal the imported checkpoint's exactly
        (read once per predictor): what `save_adapter` must write for the adapter to reproduce the student."""
        if not hasattr(self, "_backbone_export"):
            backbone = jax.device_get(self.params["t5"])
            checkpoint = str(self.config.model.get("checkpoint", "")) if self.config is not None else ""
            self._backbone_export = backbone
            if checkpoint:
                _, imported = hf.load_t5(checkpoint)
                ours = traverse_util.flatten_dict(dict(backbone))
                if all(path in ours and np.array_equal(np.asarray(ours[path], np.float32), value.astype(np.float32))
                       for path, value in traverse_util.flatten_dict(imported).items()):
                    self._backbone_export = None
        return self._backbone_export

    def load_adapter(self, path: str) -> TaskAdapter:
        """A PEFT LoRA directory (from `save_adapter` or `launch/generate_adapter.py`) as a `TaskAdapter`;
        its rank, targets and shapes must match this model's hypernetwork. Becomes the default adapter."""
        if not self.uses_adapters:
            raise ValueError(f"load_adapter: method {self.method!r} does not use generated adapters")
        cfg = self.model.config
        adapters = export.load_peft_adapter(path, cfg.t5, rank=cfg.hypernet.rank, targets=cfg.adapter_targets)
        info = export.read_tagi_info(path)
        states = export.load_instruction_states(path)
        if self.uses_fusion and states is None:
            raise ValueError(f"load_adapter: {path} has no encoded instruction ({export.STATES_FILE}) but this "
                             f"model fuses it (fusion {self.fusion!r}); regenerate it with generate_adapter")
        if states is not None and states[0].shape[-1] != cfg.t5.d_model:
            raise ValueError(f"load_adapter: {path}: instruction states have width {states[0].shape[-1]}, the "
                             f"model's d_model is {cfg.t5.d_model}")
        self.adapter = TaskAdapter(str(info.get("instruction", "")), adapters,
                                   *(states if (states is not None and self.uses_fusion) else (None, None)),
                                   source=path)
        return self.adapter

    def _adapter(self, adapter: TaskAdapter | None, what: str) -> TaskAdapter:
        adapter = adapter if adapter is not None else self.adapter
        if adapter is None:
            raise ValueError(f"{what}: no adapter; call generate_adapter(instruction) or load_adapter(path) first")
        if not isinstance(adapter, TaskAdapter):
            raise TypeError(f"{what}: expected a TaskAdapter (from generate_adapter/load_adapter), got "
                            f"{type(adapter).__name__}")
        if self.uses_adapters:
            if adapter.adapters is None:
                raise ValueError(f"{what}: this adapter carries no LoRA factors (made for method "
                                 f"{adapter.source!r}); method {self.method!r} needs a generated adapter")
            self._check_shapes(adapter, what)
            if self.uses_fusion and adapter.states is None:
                raise ValueError(f"{what}: this model fuses the encoded instruction (fusion {self.fusion!r}) but "
                                 "the adapter has none; regenerate it with generate_adapter")
        elif self.method == "concat" and not adapter.instruction.strip():
            raise ValueError(f"{what}: method 'concat' needs the adapter's instruction text, which is empty")
        return adapter

    def _check_shapes(self, adapter: TaskAdapter, what: str) -> None:
        cfg = self.model.config
        if set(adapter.adapters) != set(cfg.adapter_targets):
            raise ValueError(f"{what}: adapter targets {sorted(adapter.adapters)} differ from the model's "
                             f"adapter_targets {sorted(cfg.adapter_targets)}")
        for target, entry in adapter.adapters.items():
            a, b = np.shape(entry["A"]), np.shape(entry["B"])
            layers, d_in, d_out = lora.adapter_dims(cfg.t5, target)
            r = cfg.hypernet.rank
            if a != (layers, d_in, r) or b != (layers, r, d_out):
                raise ValueError(f"{what}: adapter[{target!r}] has A {a} / B {b}; the model expects A "
                                 f"{(layers, d_in, r)} / B {(layers, r, d_out)} (rank {r})")

    # ------------------------------------------------------------------------------------------------ inference
    def _encoder_texts(self, inputs: Sequence[str], adapter: TaskAdapter | None, format_inputs: bool) -> list[str]:
        if isinstance(inputs, str):
            raise TypeError("inputs must be a list of strings, got a single string")
        texts = [format_input(x) if format_inputs else str(x) for x in inputs]
        if self.method == "concat":
            texts = [adapter.instruction + t for t in texts]
        return texts

    def _prepare(self, inputs, adapter, format_inputs, what):
        if self.method != "no_instruction" or adapter is not None:
            adapter = self._adapter(adapter, what)
        key = check_method(self.method).encoder_input
        texts = self._encoder_texts(inputs, adapter, format_inputs)
        enc, _ = tokenize(self.vocab, texts, self.lengths[key])
        tree = adapter.table_tree() if self.uses_adapters else None
        return enc, tree

    def predict(self, inputs: Sequence[str], adapter: TaskAdapter | None = None, *, format_inputs: bool = True,
                max_decode_len: int | None = None, beam_size: int = 1) -> list[str]:
        """Generated answers for `inputs` with `adapter` (default: the last generated/loaded one)."""
        if not inputs:
            return []
        enc, tree = self._prepare(inputs, adapter, format_inputs, "predict")
        tokens, _, _ = decode_tokens(
            self.model, self.params, tree, None, enc, vocab=self.vocab, batch_size=self.batch_size,
            max_decode_len=max_decode_len or self.max_decode_len, beam_size=beam_size,
            passages=check_method(self.method).encoder_input == F.FULL_INPUTS)
        return detokenize(self.vocab, tokens)

    def score(self, inputs: Sequence[str], choices: Sequence[Sequence[str]], adapter: TaskAdapter | None = None,
              *, format_inputs: bool = True, length_normalize: bool = True) -> list[list[float]]:
        """Log-likelihood of every answer choice of every input (token-averaged unless `length_normalize`
        is False); `choices[i]` are the choices of `inputs[i]`. Rank classification picks the argmax."""
        if len(inputs) != len(choices):
            raise ValueError(f"score: {len(inputs)} inputs but {len(choices)} choice lists")
        if not inputs:
            return []
        for i, c in enumerate(choices):
            if isinstance(c, str) or not c:
                raise ValueError(f"score: choices[{i}] must be a non-empty list of strings")
        enc, tree = self._prepare(inputs, adapter, format_inputs, "score")
        owner = np.asarray([i for i, c in enumerate(choices) for _ in c], np.int32)
        flat = [str(x) for c in choices for x in c]
        targets, _ = tokenize(self.vocab, flat, self.lengths[F.TARGETS])
        dec = shift_right(targets, int(self.model.config.t5.decoder_start_token_id))
        total, mean, _, _ = score_tokens(self.model, self.params, tree, None, enc[owner], dec, targets,
                                         batch_size=self.batch_size,
                                         passages=check_method(self.method).encoder_input == F.FULL_INPUTS)
        values = mean if length_normalize else total
        out: list[list[float]] = [[] for _ in inputs]
        for i, v in zip(owner.tolist(), values.tolist()):
            out[i].append(float(v))
        return out
