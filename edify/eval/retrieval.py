"""Prompt adherence as image-to-image retrieval against the real validation images.

For a generated image made from the caption of a validation sample, rank every real validation
image by cosine similarity of Inception features to the generated one. The image is a hit at k when
one of its prompt's real images (those with the same label: `edify eval` uses the caption, so the
same emoji in every style counts) is among the k most similar; ties are resolved in favour of the
prompt's images. Top-k accuracy is the hit rate over the generated images. A model that ignored its
prompt scores about k * (real images per caption) / N_real; generated images equal to the real ones
score 100% top-1.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch
from torch import Tensor

from edify.errors import EdifyError


def cosine_similarity_matrix(a: Tensor, b: Tensor) -> Tensor:
    """cos(a_i, b_j) for all pairs: [N_a, N_b] (float64)."""
    a = a.double() / a.double().norm(dim=1, keepdim=True).clamp_min(1e-12)
    b = b.double() / b.double().norm(dim=1, keepdim=True).clamp_min(1e-12)
    return a @ b.T


def target_ranks(fake_features: Tensor, real_features: Tensor, fake_labels: Sequence[Hashable],
                 real_labels: Sequence[Hashable]) -> Tensor:
    """0-based rank of each generated image's best-matching target among all real images.

    rank_i = #{non-target real j : cos(f_i, r_j) > max_{t in targets(i)} cos(f_i, r_t)}.
    """
    if fake_features.dim() != 2 or real_features.dim() != 2 or fake_features.shape[1] != real_features.shape[1]:
        raise EdifyError(f"retrieval needs feature matrices [N, d] of one width, got "
                         f"{tuple(fake_features.shape)} and {tuple(real_features.shape)}")
    if len(fake_labels) != fake_features.shape[0]:
        raise EdifyError(f"one label per generated image is needed ({fake_features.shape[0]}), got {len(fake_labels)}")
    if len(real_labels) != real_features.shape[0]:
        raise EdifyError(f"one label per real image is needed ({real_features.shape[0]}), got {len(real_labels)}")
    index: dict[Hashable, list[int]] = {}
    for j, label in enumerate(real_labels):
        index.setdefault(label, []).append(j)
    missing = [lab for lab in fake_labels if lab not in index]
    if missing:
        raise EdifyError(f"generated image label {missing[0]!r} matches no real image")
    sim = cosine_similarity_matrix(fake_features, real_features)
    ranks = torch.empty(len(fake_labels), dtype=torch.long)
    for i, label in enumerate(fake_labels):
        targets = torch.tensor(index[label])
        best = sim[i, targets].max()
        is_target = torch.zeros(sim.shape[1], dtype=torch.bool)
        is_target[targets] = True
        ranks[i] = int(((sim[i] > best) & ~is_target).sum())
    return ranks


def retrieval_accuracy(fake_features: Tensor, real_features: Tensor, fake_labels: Sequence[Hashable],
                       real_labels: Sequence[Hashable], ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """{"retrieval_top1": ..., "retrieval_top5": ...}: fraction of generated images whose
    prompt's real image ranks within the top k (in [0, 1])."""
    if any(k < 1 for k in ks):
        raise EdifyError(f"retrieval k must be >= 1, got {list(ks)}")
    if fake_features.shape[0] == 0:
        raise EdifyError("retrieval needs at least one generated image, got 0")
    ranks = target_ranks(fake_features, real_features, fake_labels, real_labels)
    return {f"retrieval_top{k}": float((ranks < k).double().mean()) for k in ks}
