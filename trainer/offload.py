"""AdamW whose fp32 master weights and moments live in host memory, updated per subgroup on the CPU or
on the device, as a measured performance model decides each step.

It is a `torch.optim.Optimizer` whose `state` holds, for each live parameter, `exp_avg`, `exp_avg_sq`
and `step` with the names, shapes, dtypes and placements a non-offloaded AdamW gives them (DTensors
over the parameter's mesh where the parameter is one), only resident in host memory: checkpoints and
snapshots see the same state, so a run resumes with offloading switched on or off. The tensors are
views into one flat host buffer per subgroup, so a restore that writes them in place lands in the
buffers the update reads.

The master copy is the authority only while nobody else writes the parameter: a parameter whose
version counter moved since this optimizer last wrote it (a checkpoint load, a restore from memory, a
rebuilt pipeline stage) is read back into the master before its update.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.distributed.tensor import DTensor

from .offload_config import OffloadConfig
from .offload_grads import EarlyGradients
from .offload_kernels import Update, cpu_updates, fixed, torch_update
from .offload_model import Costs, Plan, choose, fits_staging, measure

log = logging.getLogger(__name__)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


@dataclass
class _Member:
    param: torch.nn.Parameter
    offset: int
    numel: int
    shape: torch.Size


@dataclass
class _Subgroup:
    """Parameters of one param group updated together; host buffers hold master, moments and gradient."""

    group: int
    members: list[_Member]
    numel: int
    master: torch.Tensor = field(init=False)
    exp_avg: torch.Tensor = field(init=False)
    exp_avg_sq: torch.Tensor = field(init=False)
    grad: torch.Tensor = field(init=False)

    def allocate(self, *, pin: bool) -> None:
        self.master, self.exp_avg, self.exp_avg_sq, self.grad = (
            torch.zeros(self.numel, dtype=torch.float32, pin_memory=pin) for _ in range(4)
        )

    def view(self, flat: torch.Tensor, member: _Member) -> torch.Tensor:
        return flat[member.offset : member.offset + member.numel].view(member.shape)


class _Staging:
    """One device buffer set a device-side subgroup is streamed through, and the events that order it."""

    def __init__(self, numel: int, device: torch.device) -> None:
        self.master, self.exp_avg, self.exp_avg_sq = (torch.empty(numel, device=device) for _ in range(3))
        self.free = torch.cuda.Event() if device.type == "cuda" else None  # its last copy out finished


class OffloadedAdamW(torch.optim.Optimizer):
    def __init__(
        self,
        params: Iterable[Any],
        *,
        lr: float,
        betas: tuple[float, float],
        eps: float,
        weight_decay: float,
        offload: OffloadConfig,
        device: torch.device,
        costs: Costs | None = None,
    ) -> None:
        # The hyperparameters exactly as torch's AdamW records them, so the groups' JSON matches its own.
        kwargs = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=device.type in ("cuda", "cpu"))
        defaults = torch.optim.AdamW([torch.zeros(1, device=device)], **kwargs).defaults
        super().__init__(params, defaults)
        self.cfg, self.device = offload, device
        self.pin = device.type == "cuda"
        self.subgroups = self._partition(offload.subgroup_numel)
        for sg in self.subgroups:
            sg.allocate(pin=self.pin)
        self._seen: dict[int, int] = {}  # id(param) -> its local tensor's version after our last write
        self._cpu_update, self.costs = self._measure(costs)
        self._staging: list[_Staging] | None = None
        self._grads: dict[int, torch.Tensor] = {}  # this step's local gradients by id(param)
        cuda = device.type == "cuda"
        self._d2h, self._h2d = (torch.cuda.Stream(device) if cuda else None for _ in range(2))
        self.plan = self._choose()
        self._scale: torch.Tensor | None = None  # the clip factor for this step's gradients (None: 1)
        self._host_scale: torch.Tensor | None = None
        self.early = EarlyGradients([[m.param for m in sg.members] for sg in self.subgroups], self._copy_early)
        self.early.set_enabled([not d for d in self.plan.on_device])
        log.info(
            "optimizer offload: %d subgroups (%s elements), mode=%s device_fraction=%s; costs %s; "
            "plan: %d on the device, modelled %.4f s per step",
            len(self.subgroups),
            [sg.numel for sg in self.subgroups],
            offload.mode,
            offload.device_fraction,
            self.costs,
            self.plan.device_count,
            self.plan.modelled_s,
        )

    # ---- construction -------------------------------------------------------------------------

    def _partition(self, limit: int) -> list[_Subgroup]:
        """Consecutive parameters of a group, up to `limit` elements per subgroup, never splitting one."""
        out: list[_Subgroup] = []
        for gi, group in enumerate(self.param_groups):
            current: list[_Member] = []
            size = 0
            for p in group["params"]:
                n = _local(p).numel()
                if current and size + n > limit:
                    out.append(_Subgroup(gi, current, size))
                    current, size = [], 0
                current.append(_Member(p, size, n, _local(p).shape))
                size += n
            if current:
                out.append(_Subgroup(gi, current, size))
        return out

    def _measure(self, costs: Costs | None) -> tuple[Update, Costs]:
        """Pick the fastest allowed CPU update and measure the machine (or take `costs`, for tests)."""
        largest = max((sg.numel for sg in self.subgroups), default=1)
        updates = cpu_updates(self.cfg.cpu_impl)
        if costs is not None:
            return next(iter(updates.values())), costs
        rates = {}
        for name, update in updates.items():
            measured = measure(
                device=self.device,
                numel=largest,
                cpu_update=fixed(update),
                device_update=fixed(torch_update),
                pin=self.pin,
            )
            rates[name] = measured
        best = max(rates, key=lambda name: rates[name].cpu_elems_per_s)
        log.info(
            "optimizer offload: CPU update rates %s; using %s", {k: v.cpu_elems_per_s for k, v in rates.items()}, best
        )
        return updates[best], rates[best]

    def _choose(self) -> Plan:
        sizes = [sg.numel for sg in self.subgroups]
        fraction = self.cfg.device_fraction
        if fraction < 0 and self.cfg.mode == "cpu":
            fraction = 0.0
        if fraction > 0 and not fits_staging(sizes, self.costs.free_device_bytes):
            raise ValueError(
                f"optim.offload.device_fraction={fraction}: two staging buffers of the largest subgroup do not fit "
                "in free device memory; lower optim.offload.subgroup_mb"
            )
        return choose(sizes, self.costs, fraction=fraction)

    def _replan(self) -> None:
        """Choose again when free device memory (what the staging buffers compete for) moved by a tenth."""
        free, _ = torch.cuda.mem_get_info(self.device)
        if abs(free - self.costs.free_device_bytes) > 0.1 * self.costs.free_device_bytes:
            self.costs = dataclasses.replace(self.costs, free_device_bytes=float(free))
            if self.cfg.mode == "auto" and self.cfg.device_fraction < 0:
                self.plan = self._choose()
                self.early.set_enabled([not d for d in self.plan.on_device])
                log.info(
                    "optimizer offload: %.1f GiB free on the device, now %d subgroups on it",
                    free / 2**30,
                    self.plan.device_count,
                )

    def _ensure_state(self) -> None:
        """Create every parameter's state on first use, as AdamW does on its first step."""
        if self.state:
            return
        for sg in self.subgroups:
            for m in sg.members:
                self.state[m.param] = {
                    "step": torch.zeros((), dtype=torch.float32),
                    "exp_avg": _like(m.param, sg.view(sg.exp_avg, m)),
                    "exp_avg_sq": _like(m.param, sg.view(sg.exp_avg_sq, m)),
                }

    def ensure_state(self) -> None:
        self._ensure_state()

    # ---- the step -----------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._ensure_state()
        cuda = self.device.type == "cuda"
        if cuda:
            self._replan()
        on_device = self.plan.on_device
        self._grads = self._local_grads()
        if cuda:
            self._d2h.wait_stream(torch.cuda.current_stream(self.device))
            self._h2d.wait_stream(torch.cuda.current_stream(self.device))
        # Gradients of the CPU's subgroups leave first (most already left during the backward pass),
        # so the host can start while the device works.
        arrived = [self._arrival(i) if not d else None for i, d in enumerate(on_device)]
        if any(on_device):
            self._staging = self._staging or [
                _Staging(max(s.numel for s in self.subgroups), self.device) for _ in range(2)
            ]
            device_subgroups = [sg for sg, d in zip(self.subgroups, on_device) if d]
            for i, sg in enumerate(device_subgroups):
                self._update_on_device(sg, self._staging[i % 2])
        for sg, event, d in zip(self.subgroups, arrived, on_device):
            if not d:
                if event is not None:
                    event.synchronize()
                self._update_on_cpu(sg)
        if cuda:
            torch.cuda.current_stream(self.device).wait_stream(self._d2h)
            for buf in self._staging or []:
                buf.free.synchronize()  # host state final before a snapshot or the next step reads it
        self._grads = {}  # only now: side-stream copies may have read them
        self._scale = self._host_scale = None
        self.early.next_step()
        return loss

    def scale_gradients(self, scale: torch.Tensor) -> None:
        """Clip this step's gradients by `scale` (0-d): applied to the copies the update reads, since
        most gradients already left the device when the global norm became known."""
        self._scale, self._host_scale = scale.detach(), scale.detach().cpu()

    def _local_grads(self) -> dict[int, torch.Tensor]:
        """Each gradient's shard as its parameter's: a gradient placed otherwise (a replicated gradient of
        a sharded parameter under TP) is redistributed first, in parameter order on every rank, since a
        redistribution may be collective and ranks may split their subgroups differently."""
        out = {}
        for group in self.param_groups:
            for p in group["params"]:
                grad = p.grad
                if grad is None:
                    continue
                if isinstance(grad, DTensor) and tuple(grad.placements) != tuple(p.placements):
                    grad = grad.redistribute(p.device_mesh, p.placements)
                out[id(p)] = _local(grad)
        return out

    def _live(self, sg: _Subgroup) -> list[tuple[_Member, torch.Tensor, torch.Tensor]]:
        """Members with a gradient, as (member, local parameter, local gradient); AdamW skips the rest."""
        return [(m, _local(m.param), self._grads[id(m.param)]) for m in sg.members if id(m.param) in self._grads]

    def _arrival(self, index: int) -> torch.cuda.Event | None:
        """Subgroup `index`'s gradients on their way to host memory: the copy made during the backward
        pass if none of them moved since, else a copy now."""
        sg = self.subgroups[index]
        grads = {id(m.param): grad for m, _, grad in self._live(sg)}
        taken, handle = self.early.take(index, grads)
        return handle if taken else self._copy_early(index, grads)

    def _copy_early(self, index: int, grads: dict[int, torch.Tensor]) -> torch.cuda.Event | None:
        """Copy the local gradients `grads` (by id of parameter) into subgroup `index`'s host buffer."""
        sg = self.subgroups[index]
        pairs = [(sg.view(sg.grad, m), grads[id(m.param)]) for m in sg.members if id(m.param) in grads]
        if self.device.type != "cuda":
            for dst, grad in pairs:
                dst.copy_(grad)
            return None
        self._d2h.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._d2h):
            for dst, grad in pairs:
                dst.copy_(grad, non_blocking=True)
                grad.record_stream(self._d2h)  # its memory is not reused before the copy is done
            event = torch.cuda.Event()
            event.record()
        return event

    def _refresh(self, sg: _Subgroup, master: torch.Tensor, members) -> None:
        """Read parameters someone else changed into the master copy `master` (host or staging)."""
        for m, local, _ in members:
            if self._seen.get(id(m.param)) != local._version:
                sg.view(master, m).copy_(local)

    def _written(self, members) -> None:
        for m, local, _ in members:
            self._seen[id(m.param)] = local._version

    def _hyper(self, sg: _Subgroup) -> dict[str, Any]:
        g = self.param_groups[sg.group]
        return dict(lr=g["lr"], betas=g["betas"], eps=g["eps"], weight_decay=g["weight_decay"])

    def _update_on_cpu(self, sg: _Subgroup) -> None:
        members = self._live(sg)
        if not members:
            return
        self._refresh(sg, sg.master, members)
        if self._host_scale is not None:
            for m, _, grad in members:
                _scale_as(sg.view(sg.grad, m), self._host_scale, grad.dtype)
        self._cpu_update(
            [sg.view(sg.master, m) for m, _, _ in members],
            [sg.view(sg.grad, m) for m, _, _ in members],
            [sg.view(sg.exp_avg, m) for m, _, _ in members],
            [sg.view(sg.exp_avg_sq, m) for m, _, _ in members],
            [self.state[m.param]["step"] for m, _, _ in members],
            **self._hyper(sg),
        )
        for m, local, _ in members:
            local.copy_(sg.view(sg.master, m), non_blocking=self.pin)
        self._written(members)

    def _update_on_device(self, sg: _Subgroup, buf: _Staging) -> None:
        """Stream the subgroup's state in, update it where its gradients are, stream it out."""
        members = self._live(sg)
        if not members:
            return
        n, cuda = sg.numel, self.device.type == "cuda"
        pairs = ((buf.master, sg.master), (buf.exp_avg, sg.exp_avg), (buf.exp_avg_sq, sg.exp_avg_sq))
        if cuda:
            self._h2d.wait_event(buf.free)
            with torch.cuda.stream(self._h2d):
                for dst, src in pairs:
                    dst[:n].copy_(src, non_blocking=True)
            torch.cuda.current_stream(self.device).wait_stream(self._h2d)
        else:
            for dst, src in pairs:
                dst[:n].copy_(src)
        self._refresh(sg, buf.master, members)
        steps = [self.state[m.param]["step"].to(self.device) for m, _, _ in members]
        torch_update(
            [sg.view(buf.master, m) for m, _, _ in members],
            [self._scaled(grad).float() for _, _, grad in members],
            [sg.view(buf.exp_avg, m) for m, _, _ in members],
            [sg.view(buf.exp_avg_sq, m) for m, _, _ in members],
            steps,
            **self._hyper(sg),
        )
        for m, local, _ in members:
            local.copy_(sg.view(buf.master, m))
        self._written(members)
        if cuda:
            self._d2h.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self._d2h):
                for dst, src in pairs:
                    src.copy_(dst[:n], non_blocking=True)
                for (m, _, _), s in zip(members, steps):
                    self.state[m.param]["step"].copy_(s, non_blocking=True)
                buf.free.record()
        else:
            for dst, src in pairs:
                src.copy_(dst[:n])
            for (m, _, _), s in zip(members, steps):
                self.state[m.param]["step"].copy_(s)

    def _scaled(self, grad: torch.Tensor) -> torch.Tensor:
        return grad if self._scale is None else grad * self._scale.to(grad.dtype)

    # ---- state ----------------------------------------------------------------------------------

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Into the host buffers, in place (`torch.optim.Optimizer` would replace the tensors)."""
        self._ensure_state()
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"optimizer state has {len(saved_groups)} parameter groups, this optimizer {len(self.param_groups)}"
            )
        params = {}
        for group, saved in zip(self.param_groups, saved_groups):
            params.update(zip(saved["params"], group["params"]))
            group.update({k: v for k, v in saved.items() if k != "params"})
        with torch.no_grad():
            for key, fields in state_dict["state"].items():
                mine = self.state[params[key]]
                for name, value in fields.items():
                    if isinstance(value, torch.Tensor):
                        _local(mine[name]).copy_(_local(value))
        self._seen.clear()  # the parameters may have been loaded too: read them before the next update

    def metrics(self) -> dict[str, float]:
        return {
            "offload_device_subgroups": float(self.plan.device_count),
            "offload_subgroups": float(len(self.subgroups)),
            "offload_early_subgroups": float(self.early.early),  # gradients copied during the backward pass
        }


def _scale_as(host: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> None:
    """`host` (fp32, a copy of a `dtype` gradient) multiplied as the gradient itself would have been in
    place: in `dtype`. A product of two bf16 or fp16 values is exact in fp32, so rounding it once to
    `dtype` gives the very bits the in-place multiply gives."""
    host.mul_(scale.to(dtype).float())
    if dtype != torch.float32:
        host.copy_(host.to(dtype))


def _like(param: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """`local` (host memory) as the state of `param`: a DTensor over its mesh where `param` is one."""
    if isinstance(param, DTensor):
        return DTensor.from_local(
            local, param.device_mesh, param.placements, run_check=False, shape=param.shape, stride=param.stride()
        )
    return local
