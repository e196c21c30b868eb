"""Separate expert denoisers per Laplacian stage (Edify Image section 2.2.2) as a denoiser wrapper.

A Laplacian model's stages are a mixture of resolution experts. One network with a stage embedding
can serve them all (the demo model does), or a stage can have a network of its own: the same
network trained further on that stage only, or a wider one. `StageExperts` routes every call to the
denoiser of its stage, D(x, sigma, cond, stage) = D_{stage}(x, sigma, cond, stage), falling back to
the shared denoiser for stages without an expert. Being a denoiser itself, it sits under guidance
(`CFGDenoiser`) and any sampler unchanged; with no experts it is the shared denoiser, bit for bit.

A batch whose samples are at different stages is split by denoiser, each part run by its own (one
call per denoiser), and put back in order.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from edify.conditioning import Cond
from edify.core.precond import Denoiser
from edify.errors import EdifyError


class StageExperts(nn.Module):
    """D(x, sigma, cond, stage) from `experts[stage]`, else from `shared`.

    shared:  the denoiser of every stage without an expert.
    experts: {stage: denoiser}; stage 0 is the finest (full resolution).
    levels:  the number of stages, to check the keys (None: not checked).
    """

    def __init__(self, shared: Denoiser, experts: Mapping[int, Denoiser], levels: int | None = None):
        super().__init__()
        for s in experts:
            if not isinstance(s, int) or s < 0 or (levels is not None and s >= levels):
                bound = f"0..{levels - 1}" if levels is not None else ">= 0"
                raise EdifyError(f"an expert's stage must be an integer in {bound}, got {s!r}")
        self.shared = shared
        self.experts = dict(experts)

    def denoiser_of(self, stage: int) -> Denoiser:
        return self.experts.get(stage, self.shared)

    def forward(self, x: Tensor, sigma: Tensor | float, cond: Cond | None = None,
                stage: Tensor | int | None = None) -> Tensor:
        if not self.experts:
            return self.shared(x, sigma, cond, stage)
        if stage is None:
            raise EdifyError("stage experts need the stage of each sample; the sampler gave none")
        st = torch.as_tensor(stage, device=x.device).reshape(-1).long()
        if st.numel() == 1 or bool((st == st[0]).all()):
            return self.denoiser_of(int(st[0]))(x, sigma, cond, stage)
        out = torch.empty_like(x)
        sig = torch.as_tensor(sigma, device=x.device)
        groups: dict[int, tuple[Denoiser, list[int]]] = {}  # one call per denoiser, not per stage
        for s in st.unique().tolist():
            D = self.denoiser_of(s)
            groups.setdefault(id(D), (D, []))[1].append(s)
        for D, stages in groups.values():
            idx = torch.isin(st, torch.tensor(stages, device=st.device)).nonzero().flatten()
            part_sigma = sig[idx] if sig.dim() and sig.numel() == x.shape[0] else sig
            part_cond = None if cond is None else cond.index(idx)
            out[idx] = D(x[idx], part_sigma, part_cond, st[idx]).to(out.dtype)
        return out
