"""Tokens in, batches out: tokenizers, token sources, and a sampler defined on the global stream.

The sampler's position counts samples of the *global* stream (all data-parallel ranks together),
so the sequence of global batches is the same whatever the data-parallel degree: a resume on
another topology continues exactly where the saved run stopped, no sample repeated or skipped.
"""

from __future__ import annotations

import json
import lzma
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import DataConfig

EMBEDDED_CORPUS = Path(__file__).parent / "corpus" / "austen.txt.xz"


class ByteTokenizer:
    """UTF-8 bytes as tokens: no vocabulary file, no download, 256 ids."""

    vocab_size = 256

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint16)


class HFTokenizer:
    """A Hugging Face `tokenizers` tokenizer read from a local file or folder."""

    def __init__(self, path: str) -> None:
        try:
            from tokenizers import Tokenizer
        except ImportError as err:
            raise ValueError("data.tokenizer is a path, which needs `pip install tokenizers`") from err
        file = Path(path) / "tokenizer.json" if Path(path).is_dir() else Path(path)
        if not file.is_file():
            raise ValueError(f"data.tokenizer={path!r}: no tokenizer.json there")
        self._tok = Tokenizer.from_file(str(file))
        self.vocab_size = self._tok.get_vocab_size()

    def encode(self, text: str) -> np.ndarray:
        ids = self._tok.encode(text).ids
        return np.asarray(ids, dtype=np.uint32 if self.vocab_size > 65535 else np.uint16)


def make_tokenizer(spec: str) -> ByteTokenizer | HFTokenizer:
    return ByteTokenizer() if spec == "bytes" else HFTokenizer(spec)


_STREAMS: dict[tuple[str, ...], np.ndarray] = {}  # token streams this process read, by what they were read from


def token_stream(cfg: DataConfig, tokenizer: ByteTokenizer | HFTokenizer) -> np.ndarray:
    """`load_tokens`, once per process: a warm restart's worker is forked from a supervisor that read
    the stream already (`read_ahead`), and decompressing or tokenizing a text again after each
    failure costs a tenth of a second (the embedded corpus) to minutes (a large text, a real tokenizer)."""
    key = (cfg.source, cfg.tokenizer, cfg.token_dtype, cfg.jsonl_key)
    if key not in _STREAMS:
        _STREAMS[key] = load_tokens(cfg, tokenizer)
    return _STREAMS[key]


def read_ahead(cfg: DataConfig) -> None:
    """Read the token stream now, for the processes this one will fork. A source that cannot be read
    is left for the worker, which reports it where a run's errors are reported."""
    try:
        token_stream(cfg, make_tokenizer(cfg.tokenizer))
    except Exception:  # the worker meets it again, and reports it
        pass


def load_tokens(cfg: DataConfig, tokenizer: ByteTokenizer | HFTokenizer) -> np.ndarray:
    """The whole token stream as a 1-D array (a memmap for pre-tokenized files)."""
    if cfg.source == "embedded":
        return tokenizer.encode(lzma.decompress(EMBEDDED_CORPUS.read_bytes()).decode("utf-8"))
    path = Path(cfg.source)
    if not path.is_file():
        raise ValueError(f"data.source={cfg.source!r} is not a file; use 'embedded', a .txt/.jsonl or a .bin/.npy")
    if path.suffix == ".npy":
        return np.load(path, mmap_mode="r")
    if path.suffix == ".bin":
        if cfg.token_dtype not in ("uint16", "uint32"):
            raise ValueError(f"data.token_dtype={cfg.token_dtype!r}: choose uint16 or uint32")
        return np.memmap(path, dtype=cfg.token_dtype, mode="r")
    if path.suffix == ".jsonl":
        docs = [json.loads(line)[cfg.jsonl_key] for line in path.read_text("utf-8").splitlines() if line.strip()]
        return tokenizer.encode("\n\n".join(docs))
    return tokenizer.encode(path.read_text("utf-8"))


class GlobalSampler:
    """Deterministic, epoch-shuffled samples of `seq_len + 1` tokens, addressed on the global stream.

    Sample j of the stream is window perm_e[j mod n] of epoch e = j // n, with perm_e seeded by
    (seed, e). State is the number of global samples consumed.
    """

    def __init__(self, tokens: np.ndarray, *, seq_len: int, seed: int) -> None:
        self.tokens, self.seq_len, self.seed = tokens, seq_len, seed
        self.n_samples = (len(tokens) - 1) // seq_len
        if self.n_samples < 1:
            raise ValueError(f"the data holds {len(tokens)} tokens, fewer than one sample of train.seq_len={seq_len}")
        self.consumed = 0
        self._perm_epoch, self._perm = -1, np.empty(0, dtype=np.int64)

    def _window(self, index: int) -> np.ndarray:
        epoch, pos = divmod(index, self.n_samples)
        if epoch != self._perm_epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm, self._perm_epoch = torch.randperm(self.n_samples, generator=generator).numpy(), epoch
        start = int(self._perm[pos]) * self.seq_len
        return np.asarray(self.tokens[start : start + self.seq_len + 1], dtype=np.int64)

    def sample_ids(self, *, global_batch: int, dp_rank: int, dp: int) -> range:
        """Global sample indices of this rank's slice of the next global batch."""
        per_rank = global_batch // dp
        first = self.consumed + dp_rank * per_rank
        return range(first, first + per_rank)

    def next_batch(self, *, global_batch: int, dp_rank: int, dp: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's (inputs, targets) of the next global batch; advances by the global batch."""
        rows = np.stack([self._window(i) for i in self.sample_ids(global_batch=global_batch, dp_rank=dp_rank, dp=dp)])
        self.consumed += global_batch
        batch = torch.from_numpy(rows)
        return batch[:, :-1], batch[:, 1:]

    def state_dict(self) -> dict[str, Any]:
        return {"consumed": self.consumed, "seed": self.seed, "seq_len": self.seq_len}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["seq_len"]) != self.seq_len or int(state["seed"]) != self.seed:
            raise ValueError(
                f"the checkpoint's data stream used seq_len={state['seq_len']}, seed={state['seed']}; "
                f"this run uses seq_len={self.seq_len}, seed={self.seed}: set train.seq_len and data.seed to match"
            )
        self.consumed = int(state["consumed"])
