"""CheckFree: rebuild a lost interior pipeline stage from its two neighbours, with no copy of its own.

Stage i comes back tensor by tensor as `W_i = (a * W_{i+1} + b * W_{i-1}) / (a + b)`, where a and b are
the neighbours' own last gradient norms (+1e-4): stage i+1 weighs by its norm, stage i-1 by its. Layers
are matched by position (stage i's k-th layer from the k-th layers of stages i-1 and i+1), which needs
every interior stage to hold as many layers, of the same shapes.

With one stage per pipeline rank and the same data/tensor-parallel sharding on every stage, the local
shard of rank (dp, tp, pp=i) is exactly the weighted average of the local shards of (dp, tp, pp=i-1)
and (dp, tp, pp=i+1); so each rank of the lost stage receives its two neighbours' local tensors over
the pipeline process group and nothing is ever gathered whole.

The first and last stages hold the embedding and the output head, which no neighbour has. Under
CheckFree+ (`parallel.pp_route=checkfree_plus`) each of the first two and the last two stages was
trained to stand in for its swap partner, whose rank also holds a copy of the embedding or the head:
such a stage is rebuilt by copying its partner, every tensor (layers, embedding, head) as it is.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed import ProcessGroup
from torch.distributed.tensor import DTensor

StateOf = Callable[[nn.Parameter], list[torch.Tensor]]  # a parameter's optimizer state tensors, created if absent
EPS = 1e-4  # added to each neighbour's norm, so two zero norms give the plain average
# Wrapper modules that insert a component into parameter names without changing what they are.
WRAPPER_NAMES = frozenset({"_checkpoint_wrapped_module", "_orig_mod", "_fsdp_wrapped_module"})
_HEADER_TAG, _PAYLOAD_TAG = 7301, 7302


class CheckFreeRefused(RuntimeError):
    """A lost stage CheckFree cannot rebuild; the message says why and what could."""


@dataclass(frozen=True)
class StagePlan:
    """One lost stage and where it comes from: the average of its neighbours `prev` and `next`, or,
    when they are the same stage (its CheckFree+ swap partner), a copy of it."""

    stage: int
    prev: int
    next: int

    @property
    def copy(self) -> bool:
        return self.prev == self.next

    @property
    def sources(self) -> list[int]:
        return [self.prev] if self.copy else [self.prev, self.next]


@dataclass(frozen=True)
class Rebuilt:
    """What one rebuild used: the neighbours (or the partner copied) and their gradient norms."""

    stage: int
    prev: int
    next: int
    norm_prev: float
    norm_next: float

    @property
    def weights(self) -> tuple[float, float]:
        """The neighbours' shares (prev, next), summing to 1."""
        return neighbour_weights(norm_prev=self.norm_prev, norm_next=self.norm_next)

    def describe(self) -> str:
        if self.prev == self.next:
            return f"stage {self.stage} copied from its swap partner, stage {self.prev} (CheckFree+)"
        w_prev, w_next = self.weights
        return f"stage {self.stage} rebuilt from stages {self.prev} (w={w_prev:.2f}) and {self.next} (w={w_next:.2f})"


# ---- pure parts -----------------------------------------------------------------------------------


def neighbour_weights(*, norm_prev: float, norm_next: float) -> tuple[float, float]:
    """(share of stage i-1, share of stage i+1): each neighbour weighs by its own norm."""
    a, b = norm_next + EPS, norm_prev + EPS
    return b / (a + b), a / (a + b)


def blend(prev: torch.Tensor, next_: torch.Tensor, *, norm_prev: float, norm_next: float) -> torch.Tensor:
    """`(a * next + b * prev) / (a + b)` elementwise, in float64, returned in `prev`'s dtype."""
    a, b = norm_next + EPS, norm_prev + EPS
    return ((a * next_.double() + b * prev.double()) / (a + b)).to(prev.dtype)


def check_topology(*, n_stages: int, stages_per_rank: int) -> None:
    """Refuse what no lost stage of this pipeline could be rebuilt on."""
    if n_stages < 3:
        raise CheckFreeRefused(
            f"CheckFree needs at least 3 pipeline stages (an interior stage with two neighbours); this run has "
            f"{n_stages}: raise parallel.pp"
        )
    if stages_per_rank > 1:
        raise CheckFreeRefused(
            f"CheckFree rebuilds one stage per pipeline rank; parallel.stages_per_rank={stages_per_rank} puts "
            "several stages on a rank: use a schedule with one stage per rank (GPipe or 1F1B)"
        )


def plan_rebuild(
    lost: Iterable[int],
    *,
    stage_layers: Sequence[Sequence[int]],
    stages_per_rank: int = 1,
    partners: Mapping[int, int] | None = None,
) -> list[StagePlan]:
    """Which neighbours rebuild each lost stage; refuses what CheckFree cannot do. `partners`: under
    CheckFree+, the stages that copy their swap partner. Pure, so every rank decides the same before
    anything is sent."""
    n_stages, partners = len(stage_layers), dict(partners or {})
    check_topology(n_stages=n_stages, stages_per_rank=stages_per_rank)
    stages = sorted(set(lost))
    for stage in stages:
        if not 0 <= stage < n_stages:
            raise CheckFreeRefused(f"stage {stage} does not exist: this pipeline has stages 0..{n_stages - 1}")
        if stage in (0, n_stages - 1) and stage not in partners:
            raise CheckFreeRefused(
                f"stage {stage} is an edge stage (it holds the {'embedding' if stage == 0 else 'output head'}, "
                "which no neighbour has): CheckFree rebuilds interior stages only; edge stages need CheckFree+ "
                "(parallel.pp_route=checkfree_plus)"
            )
    plans = [StagePlan(s, partners[s], partners[s]) if s in partners else StagePlan(s, s - 1, s + 1) for s in stages]
    for plan in plans:
        if lost_too := [source for source in plan.sources if source in stages]:
            a, b = sorted((plan.stage, lost_too[0]))
            raise CheckFreeRefused(
                f"stages {a} and {b} were lost together: stage {plan.stage} is rebuilt from "
                f"stage{'s' if not plan.copy else ''} {' and '.join(map(str, plan.sources))}, and adjacent or "
                "partnered stages cannot rebuild each other; restore from a checkpoint"
            )
        counts = {s: len(stage_layers[s]) for s in (plan.prev, plan.stage, plan.next)}
        if len(set(counts.values())) != 1:
            raise CheckFreeRefused(
                f"stage {plan.stage} cannot be rebuilt: its neighbours' shapes differ from its own (layers per stage "
                f"{counts}); choose model.n_layers divisible by the number of stages"
            )
    return plans


def layer_key(name: str, layers: Sequence[int]) -> tuple[int, str] | None:
    """(position within the stage, name within the layer) of a parameter of `layers.<id>.…`; None for
    anything else (embedding, final norm, output head)."""
    parts = [p for p in name.split(".") if p not in WRAPPER_NAMES]
    if len(parts) < 3 or parts[0] != "layers" or not parts[1].isdigit() or int(parts[1]) not in layers:
        return None
    return list(layers).index(int(parts[1])), ".".join(parts[2:])


def layer_tensors(named: Iterable[tuple[str, torch.Tensor]], layers: Sequence[int]) -> dict[tuple[int, str], str]:
    """Each layer tensor's name by its position key, in the one order every stage agrees on."""
    keyed = {}
    for name, _ in named:
        key = layer_key(name, layers)
        if key is not None:
            keyed[key] = name
    return dict(sorted(keyed.items()))


def average_neighbours(
    prev: Mapping[str, torch.Tensor],
    next_: Mapping[str, torch.Tensor],
    *,
    prev_layers: Sequence[int],
    next_layers: Sequence[int],
    lost_layers: Sequence[int],
    norm_prev: float,
    norm_next: float,
) -> dict[str, torch.Tensor]:
    """The lost stage's layer tensors, named as the lost stage names them, from its neighbours' tensors.

    Layers are matched by position: the lost stage's k-th layer from each neighbour's k-th layer.
    Tensors that are not in a layer (embedding, output head) are ignored.
    """
    prev_keys = layer_tensors(prev.items(), prev_layers)
    next_keys = layer_tensors(next_.items(), next_layers)
    if (
        len(prev_layers) != len(lost_layers)
        or len(next_layers) != len(lost_layers)
        or prev_keys.keys() != next_keys.keys()
    ):
        raise CheckFreeRefused(
            f"the neighbours' shapes differ: {len(prev_layers)} and {len(next_layers)} layers around a stage of "
            f"{len(lost_layers)}, tensors {sorted(prev_keys.keys() ^ next_keys.keys())[:4]} in only one of them"
        )
    out = {}
    for (position, rest), prev_name in prev_keys.items():
        a, b = prev[prev_name], next_[next_keys[position, rest]]
        if a.shape != b.shape:
            raise CheckFreeRefused(f"the neighbours' shapes differ: {prev_name} {tuple(a.shape)} vs {tuple(b.shape)}")
        out[f"layers.{lost_layers[position]}.{rest}"] = blend(a, b, norm_prev=norm_prev, norm_next=norm_next)
    return out


# ---- the live rebuild -----------------------------------------------------------------------------


def local_layer_tensors(
    module: nn.Module, layers: Sequence[int], *, whole: bool = False, state: StateOf | None = None
) -> list[torch.Tensor]:
    """This rank's local data of the stage's layer parameters, in position order (DTensor: its shard);
    with `whole`, then every other parameter (embedding, head) by name, each followed by its optimizer
    state (`state`): what a copy takes, so that the embedding or head it copies stays equal to the
    partner's own copy step after step."""
    params = dict(module.named_parameters())
    keyed = list(layer_tensors(params.items(), layers).values())
    if not whole:
        return [_local(params[name]) for name in keyed]
    keyed += sorted(name for name in params if layer_key(name, layers) is None)
    return [_local(t) for name in keyed for t in [params[name], *(state(params[name]) if state else [])]]


@torch.no_grad()
def rebuild_stages(
    module: nn.Module,
    *,
    stage: int,
    lost: Iterable[int],
    stage_layers: Sequence[Sequence[int]],
    norms: Mapping[int, float],
    pp_group: ProcessGroup,
    stages_per_rank: int = 1,
    partners: Mapping[int, int] | None = None,
    state: StateOf | None = None,
) -> list[Rebuilt]:
    """Rebuild the `lost` stages in place on a running job (collective: every rank calls it).

    `module` is this rank's stage module (`stage` its id, which with one stage per rank is also its
    rank in `pp_group`); `norms` holds at least this rank's own stage's last gradient norm. Each
    neighbour sends its norm and its local layer tensors to the lost stage's rank of its own (dp, tp)
    position; the lost stage's ranks copy the weighted average into their live parameters (for a
    DTensor, into its local shard). What was used comes back, the same on every rank. The optimizer
    state is the caller's business.
    """
    plans = plan_rebuild(lost, stage_layers=stage_layers, stages_per_rank=stages_per_rank, partners=partners)
    if not plans:
        return []
    assert dist.get_rank(pp_group) == stage, "with one stage per rank, a stage's id is its pipeline rank"
    receiving = next((p for p in plans if p.stage == stage), None)
    targets = [p for p in plans if stage in p.sources]
    # A copy takes every tensor, an average the layers; a stage sends what its receivers need.
    whole = receiving.copy if receiving is not None else any(p.copy for p in targets)
    if targets and receiving is None and len({p.copy for p in targets}) > 1:
        raise CheckFreeRefused(f"stage {stage} would feed both a copy and an average: rebuild one at a time")
    own = local_layer_tensors(module, stage_layers[stage], whole=whole, state=state)
    numel = sum(t.numel() for t in own)
    header = torch.tensor([norms.get(stage, 0.0), len(own), numel], dtype=torch.float64, device=own[0].device)
    to, sources = [p.stage for p in targets], receiving.sources if receiving is not None else []
    received = _exchange(header, to=to, sources=sources, group=pp_group, tag=_HEADER_TAG)
    used = _agree(plans, receiving, [*received, *received[:1]] if receiving and receiving.copy else received, own)
    payload = _pack(own) if to else own[0].new_empty(numel)  # a receiver needs only the shape
    got = _exchange(payload, to=to, sources=sources, group=pp_group, tag=_PAYLOAD_TAG)
    if receiving is not None and receiving.copy:
        for target, source in zip(own, _unpack(got[0], own)):
            target.copy_(source)
    elif receiving is not None:
        rebuilt = next(r for r in used if r.stage == stage)
        prev, next_ = (_unpack(g, own) for g in got)
        for target, a, b in zip(own, prev, next_):
            target.copy_(blend(a, b, norm_prev=rebuilt.norm_prev, norm_next=rebuilt.norm_next))
    return used


def _exchange(
    outgoing: torch.Tensor, *, to: list[int], sources: list[int], group: ProcessGroup, tag: int
) -> list[torch.Tensor]:
    """Send `outgoing` to each group rank of `to` and receive a tensor shaped like it from each of
    `sources`, all in flight at once (a stage's ranks hold the same shapes, so its own tensor is the
    template of what its neighbours send)."""
    incoming = [torch.empty_like(outgoing) for _ in sources]
    ops = [dist.P2POp(dist.isend, outgoing, group=group, group_peer=peer, tag=tag) for peer in to]
    ops += [dist.P2POp(dist.irecv, t, group=group, group_peer=peer, tag=tag) for t, peer in zip(incoming, sources)]
    if ops:
        for work in dist.batch_isend_irecv(ops):
            work.wait()
    return incoming


def _agree(
    plans: list[StagePlan], receiving: StagePlan | None, headers: list[torch.Tensor], own: list[torch.Tensor]
) -> list[Rebuilt]:
    """Every rank learns the norms the lost stages received, and whether their neighbours' tensors fit
    (one small all-reduce), so a mismatch fails everywhere rather than leaving senders waiting."""
    device = own[0].device
    vector = torch.zeros(1 + 2 * len(plans), dtype=torch.float64, device=device)
    if receiving is not None:
        index = plans.index(receiving)
        vector[1 + 2 * index : 3 + 2 * index] = torch.stack([h[0] for h in headers])
        expected = torch.tensor([len(own), sum(t.numel() for t in own)], dtype=torch.float64, device=device)
        vector[0] = float(any(not torch.equal(h[1:], expected) for h in headers))
    dist.all_reduce(vector, op=dist.ReduceOp.MAX)
    values = vector.tolist()
    if values[0]:
        raise CheckFreeRefused(
            f"stages {[p.stage for p in plans]}: a neighbour's local tensors differ from the lost stage's own in "
            "count or size (the stages must hold the same layers, sharded the same way)"
        )
    return [
        Rebuilt(stage=p.stage, prev=p.prev, next=p.next, norm_prev=values[1 + 2 * i], norm_next=values[2 + 2 * i])
        for i, p in enumerate(plans)
    ]


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor.data


def _pack(tensors: list[torch.Tensor]) -> torch.Tensor:
    """One flat buffer (one message per neighbour); every layer parameter of a stage shares a dtype."""
    dtypes = {t.dtype for t in tensors}
    assert len(dtypes) <= 1, f"a stage's parameters mix dtypes {dtypes}"
    return torch.cat([t.reshape(-1) for t in tensors])


def _unpack(flat: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    out, offset = [], 0
    for t in like:
        out.append(flat[offset : offset + t.numel()].view(t.shape))
        offset += t.numel()
    return out
