"""Other frameworks' parameter names, and the one tensor change a name carries, to resurgo's and back.

resurgo names a Llama the way torchtitan and Meta's reference code do (`layers.0.attention.wq.weight`)
and rotates adjacent pairs of channels with RoPE; Hugging Face's Llama names it
`model.layers.0.self_attn.q_proj.weight` and rotates the two halves of each head. The rows of the
query and key projections are therefore permuted between the two (the same permutation as Hugging
Face's own conversion script), and the same permutation applies to every tensor shaped like them:
master weights and both Adam moments.

A user's own names come as a JSON file: {"names": {regex: replacement}, "rotary": "halves" | "pairs"};
its patterns are tried before the built-in ones, and a name that none matches is an error.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import CheckpointError

# Hugging Face Llama -> resurgo; `\1` is the layer index.
HF_LLAMA: dict[str, str] = {
    r"model\.embed_tokens\.weight": "tok_embeddings.weight",
    r"model\.norm\.weight": "norm.weight",
    r"lm_head\.weight": "output.weight",
    r"model\.layers\.(\d+)\.self_attn\.q_proj\.weight": r"layers.\1.attention.wq.weight",
    r"model\.layers\.(\d+)\.self_attn\.k_proj\.weight": r"layers.\1.attention.wk.weight",
    r"model\.layers\.(\d+)\.self_attn\.v_proj\.weight": r"layers.\1.attention.wv.weight",
    r"model\.layers\.(\d+)\.self_attn\.o_proj\.weight": r"layers.\1.attention.wo.weight",
    r"model\.layers\.(\d+)\.mlp\.gate_proj\.weight": r"layers.\1.feed_forward.w1.weight",
    r"model\.layers\.(\d+)\.mlp\.up_proj\.weight": r"layers.\1.feed_forward.w3.weight",
    r"model\.layers\.(\d+)\.mlp\.down_proj\.weight": r"layers.\1.feed_forward.w2.weight",
    r"model\.layers\.(\d+)\.input_layernorm\.weight": r"layers.\1.attention_norm.weight",
    r"model\.layers\.(\d+)\.post_attention_layernorm\.weight": r"layers.\1.ffn_norm.weight",
}

_QUERY = re.compile(r"layers\.\d+\.attention\.wq\.weight")
_KEY = re.compile(r"layers\.\d+\.attention\.wk\.weight")


class UnknownName(CheckpointError):
    """A tensor name that no rule of the map translates."""


@dataclass(frozen=True)
class NameMap:
    """Translates one framework's Llama names to resurgo's (`to_resurgo`) and back (`from_resurgo`).

    `rotary` is the other side's RoPE convention: "halves" (Hugging Face) permutes the query and key
    rows, "pairs" (torchtitan, Meta, resurgo itself) leaves them. `n_heads` and `n_kv_heads` size
    that permutation. An empty `names` maps every name to itself."""

    names: Mapping[str, str]
    rotary: str = "pairs"
    n_heads: int = 0
    n_kv_heads: int = 0
    _rules: list[tuple[re.Pattern[str], str]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.rotary not in ("pairs", "halves"):
            raise CheckpointError(f"rotary={self.rotary!r}: use 'halves' (Hugging Face) or 'pairs' (torchtitan, Meta)")
        if self.rotary == "halves" and not (self.n_heads and self.n_kv_heads):
            raise CheckpointError("a map with rotary='halves' needs n_heads and n_kv_heads to permute q and k")
        object.__setattr__(self, "_rules", [(re.compile(p), r) for p, r in self.names.items()])

    @classmethod
    def hugging_face(cls, *, n_heads: int, n_kv_heads: int) -> NameMap:
        return cls(HF_LLAMA, rotary="halves", n_heads=n_heads, n_kv_heads=n_kv_heads)

    @classmethod
    def identity(cls) -> NameMap:
        return cls({})

    @classmethod
    def from_file(cls, path: Path, *, n_heads: int = 0, n_kv_heads: int = 0, then: NameMap | None = None) -> NameMap:
        """A user's map from JSON, its rules tried before those of `then`."""
        try:
            spec = json.loads(Path(path).read_text())
            names, rotary = dict(spec["names"]), spec.get("rotary", then.rotary if then else "pairs")
            for pattern in names:
                re.compile(pattern)
        except (OSError, ValueError, KeyError, TypeError, re.error) as e:
            raise CheckpointError(
                f"{path}: not a name map ({type(e).__name__}: {e}); write "
                '{"names": {"their\\\\.name\\\\.(\\\\d+)": "layers.\\\\1.resurgo.name"}, "rotary": "pairs"}'
            ) from None
        merged = {**names, **(dict(then.names) if then else {})}
        return cls(merged, rotary=rotary, n_heads=n_heads, n_kv_heads=n_kv_heads)

    def resurgo_name(self, name: str) -> str:
        """resurgo's name for `name`; UnknownName when no rule matches (with an identity map, `name`)."""
        if not self._rules:
            return name
        for pattern, replacement in self._rules:
            if pattern.fullmatch(name):
                return pattern.sub(replacement, name)
        raise UnknownName(
            f"no rule of the name map translates {name!r}: give a map with --name-map FILE "
            '({"names": {regex: resurgo name}}), or check that the checkpoint is of a Llama model'
        )

    def to_resurgo(self, name: str, tensor: torch.Tensor) -> tuple[str, torch.Tensor]:
        """(resurgo's name, the tensor in resurgo's convention) for a tensor named `name` on the other side."""
        ours = self.resurgo_name(name)
        return ours, self._rows(ours, tensor, to_pairs=True)

    def from_resurgo(self, name: str, tensor: torch.Tensor) -> tuple[str, torch.Tensor]:
        """(the other side's name, the tensor in its convention) for resurgo's `name`."""
        theirs = self.other_name(name)
        return theirs, self._rows(name, tensor, to_pairs=False)

    def other_name(self, ours: str) -> str:
        """The other side's name for resurgo's `ours` (the rules read backwards)."""
        if not self._rules:
            return ours
        for pattern, replacement in self._rules:
            back = _reverse(pattern.pattern, replacement, ours)
            if back is not None:
                return back
        raise UnknownName(f"resurgo's {ours!r} has no name on the other side under this map")

    def translate_all(self, names: Iterable[str]) -> dict[str, str]:
        """{their name: resurgo's name} for every name; every unknown name in one error."""
        out, unknown = {}, []
        for name in names:
            try:
                out[name] = self.resurgo_name(name)
            except UnknownName:
                unknown.append(name)
        if unknown:
            raise UnknownName(
                f"{len(unknown)} tensor name(s) no rule translates, e.g. {unknown[:3]}: give a map with "
                "--name-map FILE, or check that the checkpoint is of a Llama model"
            )
        return out

    def _rows(self, ours: str, tensor: torch.Tensor, *, to_pairs: bool) -> torch.Tensor:
        if self.rotary == "pairs" or tensor.dim() == 0:
            return tensor
        heads = self.n_heads if _QUERY.fullmatch(ours) else self.n_kv_heads if _KEY.fullmatch(ours) else 0
        return rotary_rows(tensor, heads, to_pairs=to_pairs) if heads else tensor


def rotary_rows(weight: torch.Tensor, heads: int, *, to_pairs: bool) -> torch.Tensor:
    """Permute a query/key projection's rows between RoPE on halves of each head and on adjacent pairs."""
    rows = weight.shape[0]
    if rows % (2 * heads):
        raise CheckpointError(f"a projection of {rows} rows does not split into {heads} heads of an even size")
    half = rows // heads // 2
    split = (heads, 2, half) if to_pairs else (heads, half, 2)
    return weight.reshape(*split, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape).contiguous()


def _reverse(pattern: str, replacement: str, name: str) -> str | None:
    """Read one rule backwards: match `name` against the replacement (its `\\N` as digits) and rebuild
    the pattern's literal text with the captured numbers. Rules here capture only numbers."""
    groups = [int(g) for g in re.findall(r"\\(\d+)", replacement)]
    back = re.escape(replacement)
    for g in set(groups):
        back = back.replace(re.escape(f"\\{g}"), f"(?P<g{g}>\\d+)", 1).replace(re.escape(f"\\{g}"), f"(?P=g{g})")
    m = re.fullmatch(back, name)
    if m is None:
        return None
    text, index = pattern, 0
    for capture in re.finditer(r"\((?!\?)[^)]*\)", pattern):
        index += 1
        text = text.replace(capture.group(0), m.group(f"g{index}"), 1)
    return re.sub(r"\\(.)", r"\1", text)
