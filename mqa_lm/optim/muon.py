"""Muon: momentum, then each 2-D update orthogonalised by a Newton-Schulz iteration, all matrices of
one shape at once, and with several ranks each rank orthogonalising its share.

Why not ``torch.optim.Muon`` (which this class matches update for update, state for state): it steps
one matrix at a time in Python without foreach (per matrix: momentum, a cast, a norm, five
iterations of three matmuls, the decay and the update), so a GPT-2-small step is about a thousand
small kernel launches, each a host round trip, and its time follows the host more than the FLOPs
(0.58x-0.80x of AdamW measured in train.py, 2026-12). Here the momentum, decay and update are foreach
ops over the whole group, the matrices of one shape go through one batched Newton-Schulz
(``[n, rows, cols]`` bmm / baddbmm in bf16), and under data parallelism (every rank holding the same
averaged gradient) each rank orthogonalises ``1 / world_size`` of every shape's matrices and
all-gathers the rest, so no rank repeats another's work.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any, cast

import torch
from torch import Tensor
from torch import distributed as dist
from torch.distributed.tensor import DTensor, Shard

from mqa_lm.optim.config import MUON_ADJUST_LR

# Keller Jordan's quintic coefficients and torch.optim.Muon's defaults (its group keys are ours, so an
# optimizer state saved by either loads into the other).
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_EPS = 1e-7


def newton_schulz(
    updates: Tensor,
    steps: int,
    coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
    eps: float = NS_EPS,
    splits: int | None = None,
) -> Tensor:
    """The approximate orthogonalisation (U S' V^T, S' near 1) of each matrix of ``updates`` ``[n, rows,
    cols]``, in bf16: normalised by its Frobenius norm, then ``steps`` quintic iterations whose Gram
    matrix is the smaller side, as Muon's. Muon transposes a tall matrix into its wide form and back;
    here a tall batch iterates in its own layout, as that transpose: the Gram matrix is ``X^T X`` and
    the update ``a X + X P`` (``P`` symmetric), the same products read transposed by the matmuls, so
    nothing is copied transposed (such copies were 12 of mqa_1b's 105 ms a step on an H100). The ``a X``
    term stays out of the polynomial: ``(a I + P) X`` would save ``baddbmm``'s copy of X into its output
    (8 of mqa_1b's ~98 ms on an H100), but rounding ``a + P_ii`` to bf16 put the result 2.5x further
    from a float64 iteration.

    ``splits`` > 1 computes the two symmetric products of each iteration (``X X^T`` and its square)
    by row blocks, only on and above the diagonal, and mirrors the rest: (splits + 1) / (2 splits) of
    their FLOPs, the same sums. None picks it from the shape and device (``symmetric_splits``)."""
    a, b, c = coefficients
    x = updates.bfloat16()
    tall = x.size(-2) > x.size(-1)
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
    if splits is None:
        splits = symmetric_splits(min(x.shape[-2:]), max(x.shape[-2:]), x.device)
    for _ in range(steps):
        wide = x.mT if tall else x
        if splits > 1:
            gram = _symmetric_product(wide, splits)
            poly = _symmetric_product(gram, splits, base=gram, beta=b, alpha=c)
        else:  # torch.optim.Muon's own three products (bit for bit its result on the CPU)
            gram = wide @ wide.mT
            poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.baddbmm(x, x, poly, beta=a) if tall else torch.baddbmm(x, poly, x, beta=a)
    return x


# Row blocks of the symmetric products pay on a GPU only where X X^T dominates, a matrix at least
# 4x as wide as tall, and with blocks of 512 rows or more (H100, scripts/bench_muon.py: [48, 2048,
# 8192] 59.6 ms by 4 blocks against 64.5 whole; square 2048s 11.6 against 10.6; 768 rows 2x slower).
# On the CPU the plain form is kept, so the update stays torch.optim.Muon's bit for bit there.
SYMMETRIC_MIN_ROWS = 512
SYMMETRIC_MIN_ASPECT = 4
SYMMETRIC_MAX_SPLITS = 4


def symmetric_splits(rows: int, cols: int, device: torch.device) -> int:
    """How many row blocks ``newton_schulz`` cuts the Gram matrix of a ``rows`` x ``cols`` (wide)
    matrix into on ``device``."""
    if device.type != "cuda" or cols < SYMMETRIC_MIN_ASPECT * rows:
        return 1
    splits = min(SYMMETRIC_MAX_SPLITS, rows // SYMMETRIC_MIN_ROWS)
    while splits > 1 and rows % splits:
        splits -= 1
    return max(splits, 1)


def _symmetric_product(
    a: Tensor, splits: int, base: Tensor | None = None, beta: float = 0.0, alpha: float = 1.0
) -> Tensor:
    """``beta * base + alpha * a @ a^T`` for ``a`` ``[n, m, k]`` (``base`` symmetric ``[n, m, m]``): row
    block i is computed from column i * m / splits on, each strictly lower block copied from its
    mirror. The square of a symmetric ``G`` is ``G @ G^T``, so one function serves both products."""
    m = a.size(-2)
    h = m // splits
    out = a.new_empty((*a.shape[:-1], m))
    for i in range(splits):
        rows, right = slice(i * h, (i + 1) * h), slice(i * h, m)
        if base is None:
            torch.matmul(a[..., rows, :], a[..., right, :].mT, out=out[..., rows, right])
        else:
            torch.baddbmm(
                base[..., rows, right],
                a[..., rows, :],
                a[..., right, :].mT,
                beta=beta,
                alpha=alpha,
                out=out[..., rows, right],
            )
        if i + 1 < splits:
            below = slice((i + 1) * h, m)
            out[..., below, rows] = out[..., rows, below].mT
    return out


def run_closure(closure: Callable[[], Any] | None) -> Any:
    """What an optimizer's ``step(closure)`` does first: the closure's loss, computed with gradients
    enabled (``step`` itself runs under ``no_grad``); None without a closure."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def adjusted_lr(lr: float, adjust_lr_fn: str | None, shape: torch.Size) -> float:
    """The rate a matrix of ``shape`` takes (as ``torch.optim.Muon``): ``original`` scales by
    ``sqrt(max(1, rows / cols))``, ``match_rms_adamw`` by ``0.2 * sqrt(max(rows, cols))``."""
    rows, cols = shape[:2]
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return lr * math.sqrt(max(1.0, rows / cols))
    if adjust_lr_fn == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(rows, cols))
    raise ValueError(f"unknown adjust_lr_fn {adjust_lr_fn!r}; valid choices are: {', '.join(MUON_ADJUST_LR)}")


class Muon(torch.optim.Optimizer):
    """Muon over 2-D parameters, with ``torch.optim.Muon``'s arguments, update and state.

    Per step and group: ``buf = lerp(buf, grad, 1 - momentum)``; the update is ``lerp(grad, buf,
    momentum)`` (Nesterov) or ``buf``; :func:`newton_schulz` orthogonalises it; the matrix decays by
    ``1 - lr * weight_decay`` and moves by ``-adjusted_lr(lr, adjust_lr_fn, shape)`` times the result.

    Args:
        process_group: the ranks that share the orthogonalisation. None: the default group when
            ``torch.distributed`` is initialised with more than one rank, which must then hold the
            same gradients (DDP averages them), else no sharing. Results are gathered in bf16, the
            dtype they are computed in, so sharing changes no value.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
        eps: float = NS_EPS,
        ns_steps: int = 5,
        adjust_lr_fn: str | None = None,
        process_group: dist.ProcessGroup | None = None,
    ) -> None:
        if not lr >= 0:
            raise ValueError(f"Muon lr must be >= 0, got {lr}")
        if not 0 <= momentum < 1:
            raise ValueError(f"Muon momentum must be in [0, 1), got {momentum}")
        if not weight_decay >= 0:
            raise ValueError(f"Muon weight_decay must be >= 0, got {weight_decay}")
        if not (isinstance(ns_steps, int) and 1 <= ns_steps < 100):
            raise ValueError(f"Muon ns_steps must be an integer in [1, 99], got {ns_steps!r}")
        if adjust_lr_fn is not None and adjust_lr_fn not in MUON_ADJUST_LR:
            raise ValueError(f"unknown adjust_lr_fn {adjust_lr_fn!r}; valid choices are: {', '.join(MUON_ADJUST_LR)}")
        defaults = {
            "lr": lr,
            "weight_decay": weight_decay,
            "momentum": momentum,
            "nesterov": nesterov,
            "ns_coefficients": tuple(ns_coefficients),
            "eps": eps,
            "ns_steps": ns_steps,
            "adjust_lr_fn": adjust_lr_fn,
        }
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(f"Muon trains 2-D parameters; got one of shape {tuple(p.shape)}")
        self.process_group = process_group

    def _sharing(self, param: Tensor) -> tuple[int, int, Any]:
        """(this rank, ranks that share the orthogonalisation, their process group) for a batch of
        parameters like ``param``: an FSDP2 (DTensor) parameter's mesh; else the data-parallel group
        of a multi-rank job; else this process alone."""
        if isinstance(param, DTensor):
            mesh = param.device_mesh
            if mesh.ndim != 1 or param.placements != (Shard(0),):
                raise ValueError(
                    f"Muon supports DTensor parameters sharded on their rows over a 1-D mesh (FSDP2's "
                    f"fully_shard), got placements {param.placements} on a {mesh.ndim}-D mesh; shard with "
                    "fully_shard over one mesh dimension, or use AdamW"
                )
            return mesh.get_local_rank(), mesh.size(), mesh.get_group()
        if not (dist.is_available() and dist.is_initialized()):
            return 0, 1, None
        return dist.get_rank(self.process_group), dist.get_world_size(self.process_group), self.process_group

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        loss = run_closure(closure)
        dealt = 0  # matrices dealt to ranks so far this step: the next batch's first goes to rank dealt % world
        for group in self.param_groups:
            # One batch per shape, in the parameters' own layout: an MLP's up and down projections
            # iterate apart, each without a transposed copy (newton_schulz).
            batches: dict[tuple[Any, ...], list[Tensor]] = defaultdict(list)
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse or torch.is_complex(p):
                    raise RuntimeError("Muon supports dense, real gradients only")
                batches[(p.shape, p.dtype, p.device, isinstance(p, DTensor))].append(p)
            for params in batches.values():
                self._step_batch(group, params, dealt)
                dealt += len(params)
        return loss

    def _step_batch(self, group: dict[str, Any], params: list[Tensor], dealt: int) -> None:
        rank, world, process_group = self._sharing(params[0])
        sharded = isinstance(params[0], DTensor)
        grads = [cast(Tensor, p.grad) for p in params]  # step() batches only parameters with a gradient
        bufs = []
        for p, grad in zip(params, grads):
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(grad, memory_format=torch.preserve_format)
            bufs.append(state["momentum_buffer"])
        # FSDP2: the momentum, decay and step act on this rank's rows; only the iteration needs whole matrices.
        local = _local if sharded else _same
        grads, bufs, weights = local(grads), local(bufs), local(params)
        momentum, nesterov = group["momentum"], group["nesterov"]
        torch._foreach_lerp_(bufs, grads, 1 - momentum)
        # Across ranks the matrices are dealt round robin, continuing from `dealt` (a rank short in
        # one shape is first in the next, so the totals even out); each orthogonalises its own.
        n = len(params)
        owners = [(dealt + i) % world for i in range(n)]
        mine = [i for i in range(n) if owners[i] == rank]
        share = n if world == 1 else -(-n // world)
        # The iteration's input, built in place: each update is written once, in bf16, into one stack
        # (a third of the memory traffic of stacking fp32 copies and casting).
        stack = weights[0].new_empty((share, *params[0].shape), dtype=torch.bfloat16)
        if sharded:  # every rank takes part in gathering each whole update (as FSDP's forward does the weights)
            updates = torch._foreach_lerp(grads, bufs, momentum) if nesterov else bufs
            whole = [_whole(u, p) for u, p in zip(updates, params)]
        for slot, i in enumerate(mine):
            out = stack[slot]
            if sharded:
                out.copy_(whole[i])
            elif nesterov:
                torch.lerp(grads[i], bufs[i], momentum, out=out)
            else:
                out.copy_(bufs[i])
        ns = (group["ns_steps"], group["ns_coefficients"], group["eps"])
        if len(mine) == share:
            ortho = newton_schulz(stack, *ns)
        else:  # a short share: iterate only this rank's matrices, send zeros for the padding
            ortho = stack
            if mine:
                ortho[: len(mine)] = newton_schulz(stack[: len(mine)], *ns)
            ortho[len(mine) :].zero_()
        rows = list(range(n))
        if world > 1:
            ortho, rows = _all_gather(ortho, owners, world, process_group)
        lr, decay = group["lr"], group["weight_decay"]
        if decay:
            torch._foreach_mul_(weights, 1 - lr * decay)
        # The bf16 updates are added as torch.optim.Muon adds its own, at the rate of the batch's shape.
        steps = [ortho[row] for row in rows]
        if sharded:
            steps = [_rows_of(step, rank, world, weight) for step, weight in zip(steps, weights)]
        torch._foreach_add_(weights, steps, alpha=-adjusted_lr(lr, group["adjust_lr_fn"], params[0].shape))


# torch 2.13 renamed all_gather_into_tensor (deprecated there) to all_gather_single; older torch has only the first.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _all_gather(local: Tensor, owners: list[int], world: int, process_group: Any) -> tuple[Tensor, list[int]]:
    """Every rank's orthogonalised share (each ``local``, padded to the same count) in one tensor, and
    the row in it of each matrix, given the rank that owns it."""
    share = local.size(0)
    gathered = local.new_empty((world * share, *local.shape[1:]))
    _all_gather_single(gathered, local, group=process_group)
    taken = [0] * world
    rows = []
    for owner in owners:
        rows.append(owner * share + taken[owner])
        taken[owner] += 1
    return gathered, rows


def _same(tensors: list[Tensor]) -> list[Tensor]:
    return tensors


def _local(tensors: list[Tensor]) -> list[Tensor]:
    """This rank's shard of each DTensor (in place operations on it change the DTensor)."""
    return [cast(DTensor, t).to_local() for t in tensors]


def _whole(local_rows: Tensor, param: Tensor) -> Tensor:
    """The whole matrix whose rows ``local_rows`` are this rank's shard, laid out as ``param``."""
    param = cast(DTensor, param)
    whole = DTensor.from_local(
        local_rows, param.device_mesh, param.placements, shape=param.shape, stride=param.stride(), run_check=False
    )
    return whole.full_tensor()


def _rows_of(matrix: Tensor, rank: int, world: int, shard: Tensor) -> Tensor:
    """This rank's rows of ``matrix``, as ``Shard(0)`` splits it (``torch.chunk``; trailing ranks may
    hold none)."""
    chunks = matrix.chunk(world, dim=0)
    rows = chunks[rank] if rank < len(chunks) else matrix[:0]
    if rows.shape != shard.shape:
        raise RuntimeError(f"Muon: rank {rank}'s shard is {tuple(shard.shape)}, but Shard(0) gives {tuple(rows.shape)}")
    return rows
