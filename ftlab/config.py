"""GPT hyper-parameters with FasterTransformer's names, read from and written to FT's `config.ini`."""
from __future__ import annotations

import configparser
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

WEIGHT_DATA_TYPES = ("fp32", "fp16")
COMPUTE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class ConfigError(ValueError):
    """A config.ini or a config value is wrong; the message names the file and key."""


@dataclass
class GPTConfig:
    head_num: int = 16  # attention heads
    size_per_head: int = 64  # hidden = head_num * size_per_head
    num_layer: int = 24  # decoder blocks
    vocab_size: int = 50257  # rows of the token embedding (may be padded, e.g. Megatron's 50304)
    max_pos_seq_len: int = 1024  # rows of the position embedding: prompt + output must fit
    inter_size: int = 0  # MLP width; 0 means 4 * hidden
    layernorm_eps: float = 1e-5
    start_id: int = 50256
    end_id: int = 50256
    weight_data_type: str = "fp32"  # dtype of the .bin files: fp32 | fp16
    tensor_para_size: int = 1  # number of tensor-parallel shards the .bin files are split into
    model_name: str = "gpt"

    def __post_init__(self):
        if not self.inter_size:
            self.inter_size = 4 * self.hidden
        self.validate()

    @property
    def hidden(self) -> int:
        return self.head_num * self.size_per_head

    def validate(self) -> None:
        for name in ("head_num", "size_per_head", "num_layer", "vocab_size", "max_pos_seq_len", "inter_size",
                     "tensor_para_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"GPTConfig.{name} must be a positive integer, got {value!r}")
        if self.weight_data_type not in WEIGHT_DATA_TYPES:
            raise ConfigError(f"GPTConfig.weight_data_type must be one of {WEIGHT_DATA_TYPES}, "
                              f"got {self.weight_data_type!r}")
        if not self.layernorm_eps > 0:
            raise ConfigError(f"GPTConfig.layernorm_eps must be > 0, got {self.layernorm_eps!r}")
        for name in ("start_id", "end_id"):
            value = getattr(self, name)
            if not 0 <= value < self.vocab_size:
                raise ConfigError(f"GPTConfig.{name}={value} is outside the vocabulary [0, {self.vocab_size})")

    # --- FasterTransformer's config.ini ([gpt] section) -------------------------------------------------
    _INT_KEYS = ("head_num", "size_per_head", "inter_size", "num_layer", "vocab_size", "max_pos_seq_len",
                 "start_id", "end_id", "tensor_para_size")

    @classmethod
    def from_ini(cls, path: str | Path) -> "GPTConfig":
        """Read `config.ini` as FT's converters write it. Keys FT's older converters omit get FT's defaults:
        inter_size = 4*hidden, layernorm_eps = 1e-5, tensor_para_size from the `<N>-gpu` directory name."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config.ini not found")
        parser = configparser.ConfigParser()
        try:
            parser.read(path)
        except configparser.Error as exc:
            raise ConfigError(f"{path}: not a valid ini file ({exc.__class__.__name__}: {exc})") from None
        if "gpt" not in parser:
            raise ConfigError(f"{path}: no [gpt] section (sections: {parser.sections()})")
        section = parser["gpt"]
        kwargs: dict = {}
        for key in cls._INT_KEYS:
            if key in section:
                try:
                    kwargs[key] = int(section[key])
                except ValueError:
                    raise ConfigError(f"{path}: [gpt] {key} = {section[key]!r} is not an integer") from None
        for key in ("head_num", "size_per_head", "num_layer", "vocab_size"):
            if key not in kwargs:
                raise ConfigError(f"{path}: [gpt] lacks the required key {key!r}")
        if "layernorm_eps" in section:
            try:
                kwargs["layernorm_eps"] = float(section["layernorm_eps"])
            except ValueError:
                raise ConfigError(f"{path}: [gpt] layernorm_eps = {section['layernorm_eps']!r} is not a number") from None
        if "weight_data_type" in section:
            kwargs["weight_data_type"] = section["weight_data_type"].strip()
        if "model_name" in section:
            kwargs["model_name"] = section["model_name"].strip()
        if "tensor_para_size" not in kwargs:
            kwargs["tensor_para_size"] = _gpu_count_from_dirname(path.parent) or 1
        if section.get("has_adapters", "0").strip().lower() in ("1", "true"):
            raise ConfigError(f"{path}: has_adapters = {section['has_adapters']} is not supported by ftlab")
        try:
            return cls(**kwargs)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None

    def to_ini(self, path: str | Path) -> None:
        parser = configparser.ConfigParser()
        parser["gpt"] = {
            "model_name": self.model_name,
            "head_num": str(self.head_num),
            "size_per_head": str(self.size_per_head),
            "inter_size": str(self.inter_size),
            "num_layer": str(self.num_layer),
            "max_pos_seq_len": str(self.max_pos_seq_len),
            "vocab_size": str(self.vocab_size),
            "has_adapters": "False",
            "adapter_inter_size": "0",
            "layernorm_eps": repr(self.layernorm_eps),
            "start_id": str(self.start_id),
            "end_id": str(self.end_id),
            "weight_data_type": self.weight_data_type,
            "tensor_para_size": str(self.tensor_para_size),
        }
        with open(path, "w") as f:
            parser.write(f)

    def replace(self, **changes) -> "GPTConfig":
        return dataclasses.replace(self, **changes)


def _gpu_count_from_dirname(directory: Path) -> int | None:
    name = directory.name
    if name.endswith("-gpu") and name[: -len("-gpu")].split("-")[-1].isdigit():
        return int(name[: -len("-gpu")].split("-")[-1])
    return None


def compute_dtype(name: str | torch.dtype) -> torch.dtype:
    """'fp32' | 'fp16' | 'bf16' (or a torch dtype) -> torch dtype, with a clear error otherwise."""
    if isinstance(name, torch.dtype):
        if name in COMPUTE_DTYPES.values():
            return name
        raise ValueError(f"dtype {name} is not supported; use one of {list(COMPUTE_DTYPES)}")
    if name not in COMPUTE_DTYPES:
        raise ValueError(f"unknown dtype {name!r}; use one of {list(COMPUTE_DTYPES)}")
    return COMPUTE_DTYPES[name]
