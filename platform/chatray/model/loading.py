"""Build, load and save GPT-2-family causal LMs in Hugging Face format (safetensors only).

A model is named by:
  * ``tiny`` - built from :func:`chatray.model.presets.tiny_config` (random init, the dataset's tokenizer);
  * a hub preset or id (``gpt2``, ``gpt2-medium``, ``openai-community/gpt2``) - needs network or the HF cache;
  * a local folder with ``config.json`` + ``model.safetensors`` (e.g. a chatray checkpoint);
  * a chatray checkpoint URI (``<storage>/<run>:best``, ``s3://.../checkpoint_...``) - resolved and cached.

Pickled weights (``pytorch_model.bin``) are refused: loading them can run arbitrary code. Training (resume) and
serving both load a saved folder through :func:`load_model`, so both follow one weights guard and one dtype rule.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from chatray.errors import ChatrayError
from chatray.model.presets import GPT2_ARCH, HUB_PRESETS, is_tiny, tiny_config
from chatray.model.vocab import unpadded_vocab

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "build_model",
    "config_context_length",
    "load_model",
    "load_model_tokenizer",
    "model_context_length",
    "model_source",
    "quiet_transformers",
    "resolve_device",
    "resolve_dtype",
    "save_model",
]

# Suffixes of pickled weight files, which chatray refuses to load. train_state.pt sits in every checkpoint folder
# (optimizer state, read with weights_only=True by training) and is not model weights.
_PICKLED_SUFFIXES = {".bin", ".pt", ".pth", ".ckpt", ".pkl"}
_TRAIN_STATE = "train_state.pt"


def quiet_transformers() -> None:
    """Silence transformers' per-shard progress bars and advisory warnings (training logs stay readable)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def _is_checkpoint_uri(name: str) -> bool:
    return name.endswith((":latest", ":best")) or name.startswith("s3://")


def model_source(name: str) -> str:
    """Where the weights of ``name`` come from: ``tiny``, a local folder, or a hub id (aliases expanded).

    Checkpoint URIs (``run:best``, ``s3://``) are resolved and copied to the local cache first.
    """
    if is_tiny(name):
        return name
    if _is_checkpoint_uri(name):
        from chatray.storage.checkpoints import materialize_checkpoint

        return str(materialize_checkpoint(name))
    p = Path(name).expanduser()
    if p.is_dir():
        return str(p.resolve())
    if name.startswith((".", "/", "~")):
        raise ChatrayError(f"model folder not found: {name}", hint="use tiny, gpt2, gpt2-medium, a hub id or a folder")
    return HUB_PRESETS.get(name, name)


def _check_folder(folder: Path) -> None:
    """The one weights guard: a ``config.json`` and safetensors weights, never pickled ones."""
    if not (folder / "config.json").is_file():
        raise ChatrayError(f"not a model folder (no config.json): {folder}",
                           hint="point at a checkpoint folder written by `chatray train`")
    if (folder / "model.safetensors").is_file() or (folder / "model.safetensors.index.json").is_file():
        return
    pickled = sorted(p.name for p in folder.iterdir() if p.suffix in _PICKLED_SUFFIXES and p.name != _TRAIN_STATE)
    if pickled:
        raise ChatrayError(f"refusing to load pickled weights {', '.join(pickled)} from {folder}: "
                           "chatray loads safetensors only",
                           hint="convert with `model.save_pretrained(dir, safe_serialization=True)`")
    raise ChatrayError(f"{folder}: no model.safetensors", hint="is this a complete checkpoint folder?")


def config_context_length(config: Any) -> int | None:
    """A model config's context in tokens: ``n_positions`` (GPT-2) or ``max_position_embeddings`` (others)."""
    return getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)


def resolve_device(device: str) -> str:
    """``auto`` becomes ``cuda`` when a CUDA device is present, else ``cpu``; other names pass through."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """The dtype rule for weights.

    Args:
        dtype: ``auto``, ``float32``, ``float16`` or ``bfloat16``.
        device: where the weights go (``cpu``, ``cuda``, ``cuda:N``).

    Returns:
        The named dtype; for ``auto``, bfloat16 on a GPU that supports it, float16 on other GPUs, float32 on CPU
        (half precision on CPU is slower than float32 and loses accuracy).

    Raises:
        ValueError: an unknown dtype name.
    """
    import torch

    if dtype == "auto":
        if not device.startswith("cuda"):
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    try:
        return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    except KeyError as e:
        raise ValueError(f"dtype must be auto, float32, float16 or bfloat16, got {dtype!r}") from e


def _dtype_kwarg() -> str:
    # from_pretrained takes `dtype` from transformers 4.56 on; older versions (pyproject allows 4.45) only know
    # `torch_dtype` and would silently load float32 when given `dtype`.
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


def build_model(name: str, *, vocab_size: int, block_size: int, eos_token_id: int, n_layer: int | None = None,
                n_head: int | None = None, n_embd: int | None = None, dropout: float | None = None,
                seed: int = 0) -> PreTrainedModel:
    """The model to fine-tune: a fresh ``tiny`` GPT-2, or pretrained weights from a folder/hub id.

    Args:
        name: ``tiny``, a hub preset/id, a local folder or a chatray checkpoint URI.
        vocab_size: the dataset tokenizer's size (``tiny`` only; a pretrained model keeps its own).
        block_size: training context; ``tiny`` gets exactly this many positions.
        eos_token_id: the tokenizer's EOS (also BOS/PAD) id.
        n_layer, n_head, n_embd: ``tiny`` shape overrides.
        dropout: overrides the model's dropout when given.
        seed: random init seed (``tiny``).

    Returns:
        A float32 ``GPT2LMHeadModel`` (or other causal LM) using SDPA attention, in train mode.

    Raises:
        ChatrayError: unknown/unreachable model, pickled weights only, context shorter than ``block_size``.
    """
    import torch
    from transformers import AutoModelForCausalLM, GPT2LMHeadModel

    quiet_transformers()
    if is_tiny(name):
        torch.manual_seed(seed)
        model: Any = GPT2LMHeadModel(tiny_config(vocab_size, block_size, eos_token_id=eos_token_id, n_layer=n_layer,
                                                 n_head=n_head, n_embd=n_embd, dropout=dropout))
    else:
        src = model_source(name)
        if Path(src).is_dir():
            _check_folder(Path(src))
        kwargs: dict[str, Any] = {_dtype_kwarg(): torch.float32}
        if dropout is not None:
            kwargs.update(resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout)
        try:
            model = AutoModelForCausalLM.from_pretrained(src, attn_implementation="sdpa", use_safetensors=True,
                                                         **kwargs)
        except Exception as e:  # OSError (not found / offline), ValueError (bad config), EnvironmentError
            raise ChatrayError(f"cannot load model {name!r}: {str(e).splitlines()[0]}",
                               hint="use a local folder or check network access to the model hub "
                               "(offline, use model.name: tiny)") from e
        ctx = config_context_length(model.config)
        if ctx is not None and block_size > ctx:
            raise ChatrayError(f"block size {block_size} exceeds the context of model {name!r} ({ctx} tokens)",
                               hint=f"set data.block_size <= {ctx}")
    model.train()
    return model


def load_model(folder: str | Path, *, device: str = "cpu", dtype: str = "float32") -> PreTrainedModel:
    """Load a saved model folder (safetensors only) for inference or further training.

    Args:
        folder: a local folder with ``config.json`` and ``model.safetensors`` (e.g. a chatray checkpoint).
        device: ``cpu``, ``cuda``, ``cuda:N``, or ``auto`` (see :func:`resolve_device`).
        dtype: ``float32``, ``float16``, ``bfloat16``, or ``auto`` (see :func:`resolve_dtype`).

    Returns:
        The causal LM with SDPA attention, on ``device``, in eval mode.

    Raises:
        ChatrayError: no ``config.json``, pickled weights only, or an unloadable checkpoint.
        ValueError: an unknown dtype name.
    """
    from transformers import AutoModelForCausalLM

    quiet_transformers()
    path = Path(folder)
    _check_folder(path)
    target = resolve_device(device)
    weights_dtype = resolve_dtype(dtype, target)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), attn_implementation="sdpa", use_safetensors=True,
                                                     local_files_only=True, **{_dtype_kwarg(): weights_dtype})
    except Exception as e:  # OSError (unreadable files), ValueError/KeyError (bad config): all "cannot load"
        raise ChatrayError(f"cannot load model from {folder}: {str(e).splitlines()[0] if str(e) else e!r}") from e
    return model.to(target).eval()


def load_model_tokenizer(folder: str | Path) -> PreTrainedTokenizerBase:
    """The tokenizer saved beside a model's weights (with its chat template), from local files only.

    Raises:
        ChatrayError: the folder has no loadable tokenizer.
    """
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:  # OSError (missing files), ValueError (unknown tokenizer class)
        raise ChatrayError(f"cannot load the tokenizer of {folder}: {str(e).splitlines()[0] if str(e) else e!r}",
                           hint="a checkpoint folder written by `chatray train` carries its tokenizer") from e


def save_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None, folder: str | Path) -> None:
    """Write ``config.json``, ``generation_config.json``, ``model.safetensors`` and the tokenizer to ``folder``.

    The generation config carries EOS/PAD so that ``generate`` stops at the end of an assistant turn. A model
    whose vocabulary was padded for training (:mod:`chatray.model.vocab`) is saved tokenizer-sized.
    """
    from transformers import GenerationConfig

    quiet_transformers()
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    model = getattr(model, "_orig_mod", model)  # torch.compile wrapper
    model = getattr(model, "module", model)  # DDP wrapper
    eos = tokenizer.eos_token_id if tokenizer is not None else model.config.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer is not None and tokenizer.pad_token_id is not None else eos
    model.generation_config = GenerationConfig(bos_token_id=model.config.bos_token_id, eos_token_id=eos,
                                               pad_token_id=pad)
    with unpadded_vocab(model):
        model.save_pretrained(str(out), safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))


def model_context_length(name: str) -> int | None:
    """The context (``n_positions``) of a pretrained model without loading weights; None for ``tiny``/unknown."""
    if is_tiny(name):
        return None
    alias = name.removeprefix("openai-community/")
    if alias in GPT2_ARCH and not Path(name).exists():
        return GPT2_ARCH[alias][3]
    try:
        src = model_source(name)
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(src)
    except Exception:
        return None
    return config_context_length(cfg)

