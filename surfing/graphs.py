"""Fixed-shape solver steps captured once as a CUDA graph and replayed at every checkpoint.

A small-batch solve on a GPU is bound by kernel launches, not arithmetic: one Adam step is
~30 small kernels. Replaying the whole step (forward, backward, update) as one captured graph
ran 7.8x faster at batch 1 and 4.7x at batch 300 on an H100 (bench/gpu_bench.py). A graph
records the address of every tensor it touches, so a runner owns them all: its own copy of the
generator (each new network is copied into it in place), the targets, the latents and the
solver state, which are reset in place before every use. Two fixed-shape loops fit: Adam
(the paper's schedule, direct descent) and the Levenberg–Marquardt step of schedule "lm"'s
intermediate stages. Both are written without host synchronisation, and the same code runs
eagerly on a CPU, where the tests require it to equal the plain solvers (bit for bit, except
where levenberg_marquardt retries a step in a smaller batch and so rounds differently).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from surfing.lm import gauss_newton_step, into_ball, jacobian, objective, residual

BETA1, BETA2, EPS = 0.9, 0.999, 1e-8  # torch.optim.Adam's defaults, as adam_descent uses
WARMUP_RUNS = 3  # eager runs on a side stream before capture (cuDNN/autograd set-up)


def _bare_copy(G: nn.Module) -> nn.Module:
    """A deep copy of G without its hooks: they belong to the caller (a worker counts forward
    passes for progress with one) and would fire while the graph is captured, not on replays."""
    memo: dict[int, object] = {}
    for module in G.modules():
        for name, value in vars(module).items():
            if "hooks" in name and isinstance(value, dict):
                memo[id(value)] = type(value)()
    return copy.deepcopy(G, memo).eval()


class _Replayed:
    """A generator copy, a batch's targets and one body of work replayed from a CUDA graph."""

    def __init__(self, G: nn.Module, b: torch.Tensor, A: torch.Tensor | None, k: int) -> None:
        self.G = _bare_copy(G)  # the graph's weights; later networks are copied in
        self.b = b.detach().clone()
        self.A = None if A is None else A.detach().clone()
        self.x = torch.zeros(b.shape[0], k, device=b.device, dtype=b.dtype)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.on_gpu = b.device.type == "cuda"

    def _body(self) -> None:
        raise NotImplementedError

    def _reset(self, x0: torch.Tensor) -> None:
        with torch.no_grad():
            self.x.copy_(x0)

    def _load(self, G: nn.Module) -> None:
        """Copy G's weights into the graph's generator in place (same architecture)."""
        with torch.no_grad():
            mine = dict(self.G.named_parameters()) | dict(self.G.named_buffers())
            theirs = dict(G.named_parameters()) | dict(G.named_buffers())
            if mine.keys() != theirs.keys():
                raise ValueError("the network's architecture changed between stages")
            for name, dst in mine.items():
                dst.copy_(theirs[name])

    def _capture(self) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUP_RUNS):
                self._body()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: the trajectory's prefetch thread keeps copying the next checkpoints to
        # the GPU during the capture; "global" would forbid its allocations and copies
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self._body()

    def _run(self, G: nn.Module, x0: torch.Tensor, times: int) -> None:
        """Load G, reset the state to x0, then run the body `times` times (replays on a GPU)."""
        self._load(G)
        if self.on_gpu and self.graph is None and times > 0:
            self._reset(x0)
            self._capture()  # the warm-up moved the state; the reset below undoes it
        self._reset(x0)
        for _ in range(times):
            if self.graph is not None:
                self.graph.replay()
            else:
                self._body()


class GraphedAdam(_Replayed):
    """Fixed-shape Adam descents on f(x) = 1/2 ||A G(x) - b||^2 for one batch of targets.

    Build it once per solve and call `descend` per network: the paper's schedule descends every
    checkpoint with the same step, so one capture serves the whole trajectory. Every descent
    starts from fresh Adam state, as adam_descent's does.
    """

    def __init__(
        self, G: nn.Module, b: torch.Tensor, A: torch.Tensor | None, lr: float, k: int
    ) -> None:
        super().__init__(G, b, A, k)
        self.lr = lr
        self.x.requires_grad_(True)
        self.m = torch.zeros_like(self.x, requires_grad=False)
        self.v = torch.zeros_like(self.m)
        # float64, as torch.optim.Adam computes its bias corrections in Python floats
        self.t = torch.zeros((), device=b.device, dtype=torch.float64)

    def _body(self) -> None:
        """One Adam step, in place, in torch.optim.Adam's order of operations."""
        f = objective(self.G, self.x, self.b, self.A)
        (g,) = torch.autograd.grad(f.sum(), self.x)
        with torch.no_grad():
            self.t.add_(1)
            self.m.lerp_(g, 1 - BETA1)
            self.v.mul_(BETA2).addcmul_(g, g, value=1 - BETA2)
            step_size = self.lr / (1 - BETA1**self.t)
            denom = (self.v.sqrt() / (1 - BETA2**self.t).sqrt()).add_(EPS)
            self.x.sub_(step_size * self.m / denom)

    def _reset(self, x0: torch.Tensor) -> None:
        super()._reset(x0)
        self.m.zero_()
        self.v.zero_()
        self.t.zero_()

    def descend(
        self, G: nn.Module, x0: torch.Tensor, steps: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`steps` Adam steps on G from x0 (fresh state). Returns (x, per-target objective)."""
        self._run(G, x0, steps)
        with torch.no_grad():
            f = objective(self.G, self.x, self.b, self.A)
        return self.x.detach().clone(), f


class GraphedLMStage(_Replayed):
    """Schedule "lm"'s intermediate stage as one graph: per target, one Jacobian and up to
    `trials` damped Gauss–Newton trials until one lowers f (λ /= 3 on success, *= 4 on
    failure) -- the arithmetic of `levenberg_marquardt(..., max_iters=trials, max_accepts=1)`,
    but on the whole batch with `where` masks instead of index lists, so every shape is fixed.
    Every trial evaluates every target (a finished one's result is discarded); the reported
    cost counts only the trials a target needed, as levenberg_marquardt does.
    """

    def __init__(
        self,
        G: nn.Module,
        b: torch.Tensor,
        A: torch.Tensor | None,
        k: int,
        trials: int = 1,
        lam: float = 1e-3,
        ftol: float = 1e-12,
        radius: float | None = None,
    ) -> None:
        super().__init__(G, b, A, k)
        self.trials, self.lam0, self.ftol, self.radius = trials, float(lam), ftol, radius
        self.x_out = torch.zeros_like(self.x)
        self.f_out = torch.zeros(b.shape[0], dtype=b.dtype, device=b.device)
        self.active = torch.zeros(b.shape[0], dtype=torch.bool, device=b.device)
        self.tried = torch.zeros(b.shape[0], dtype=b.dtype, device=b.device)

    def _body(self) -> None:
        with torch.no_grad():
            out, J = jacobian(self.G, self.x, self.A)  # r from its primal, as in LM
            r = out - self.b
            f = 0.5 * r.pow(2).sum(1)
            J = J.contiguous()  # as levenberg_marquardt's stored copy: JᵀJ rounds the same
            active = f >= self.ftol  # levenberg_marquardt leaves converged targets alone
            searching = active.clone()
            lam = torch.full_like(f, self.lam0)
            x_new, f_new, tried = self.x.clone(), f.clone(), torch.zeros_like(f)
            for _ in range(self.trials):
                step, _ = gauss_newton_step(J, r, lam)
                x_try = into_ball(self.x + step, self.radius)
                f_try = 0.5 * residual(self.G, x_try, self.b, self.A).pow(2).sum(1)
                ok = searching & (f_try < f)
                x_new = torch.where(ok[:, None], x_try, x_new)
                f_new = torch.where(ok, f_try, f_new)
                tried += searching.to(tried.dtype)
                lam = torch.where(ok, lam / 3, lam * 4).clamp(1e-12, 1e12)
                searching = searching & ~ok
            self.x_out.copy_(x_new)
            self.f_out.copy_(f_new)
            self.active.copy_(active)
            self.tried.copy_(tried)

    def step(
        self, G: nn.Module, x0: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The stage on G from x0: (x, objective, evals per target), costed as
        levenberg_marquardt costs it (the Jacobian with its primal pass, then the trials)."""
        self._run(G, x0, 1)
        k = self.x.shape[1]
        forwards = (1 + k) + torch.where(self.active, self.tried, 0.0)
        return self.x_out.clone(), self.f_out.clone(), (forwards / 2).cpu()
