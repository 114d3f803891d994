"""Cross-attention variants of PISCES Table 8, and VTM probabilities of matched/mismatched pairs under each.

The table compares vanilla cross-attention with full OT, partial OT and the spatio-temporal cost
terms inside a backbone's fusion layers. :func:`vtm_probabilities` encodes every video and
caption once and reruns only the fusion layers per variant; accuracy is computed by
:func:`pisces_fast.eval.alignment.vtm_accuracy` (see ``benchmarks/alignment_table.py``).
"""
from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from .backbones.base import VideoTextBackbone
from .backbones.preprocess import check_prompts
from .patching import POTConfig, patch_cross_attention


def table8_variants(backend: str = "auto") -> Dict[str, Optional[POTConfig]]:
    """The rows of Table 8 (None = vanilla cross-attention). OT rows without spatio-temporal terms use γ = η = 0."""
    def pot(mass, gamma=0.0, eta=0.0):
        return POTConfig(mass=mass, gamma=gamma, eta=eta, backend=backend)

    return {
        "Vanilla cross-attention": None,
        "Full OT (m=1.0)": pot(1.0),
        "Partial OT (m=0.5)": pot(0.5),
        "Partial OT (m=0.9)": pot(0.9),
        "Partial OT (m=0.9) + spatial only (eta=0.2)": pot(0.9, eta=0.2),
        "Partial OT (m=0.9) + temporal only (gamma=0.2)": pot(0.9, gamma=0.2),
        "Partial OT (m=0.9) + spatio-temporal (0.1, 0.1)": pot(0.9, 0.1, 0.1),
        "Partial OT (m=0.9) + spatio-temporal (0.2, 0.2)": pot(0.9, 0.2, 0.2),
    }


def mismatched_indices(prompts: Sequence[str]) -> torch.Tensor:
    """For each i, the nearest following j (cyclically) whose prompt differs from prompt i."""
    n = len(prompts)
    out = []
    for i in range(n):
        for step in range(1, n):
            j = (i + step) % n
            if prompts[j] != prompts[i]:
                out.append(j)
                break
        else:
            raise ValueError("all prompts are identical: no mismatched pairs can be formed")
    return torch.tensor(out, dtype=torch.long)


@torch.no_grad()
def vtm_probabilities(
    backbone: VideoTextBackbone,
    videos: torch.Tensor,
    prompts: Sequence[str],
    variants: Optional[Mapping[str, Optional[POTConfig]]] = None,
    *,
    negatives: Optional[Sequence[str]] = None,
    batch_size: int = 16,
    progress: bool = True,
) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
    """P(match) of matched pairs (video i, prompt i) and mismatched ones (video i, a different prompt).

    Args:
        backbone: the VTM model.
        videos: ``(n, T, 3, H, W)`` in [0, 1]; prompts: their n captions.
        variants: name → :class:`POTConfig` or None (default :func:`table8_variants`).
        negatives: the mismatched caption of each video (e.g. an attribute-swapped one, the hard case);
            default: the nearest following different prompt of the set (:func:`mismatched_indices`).

    Returns:
        name → ``(matched (n,), mismatched (n,))`` probabilities on CPU.
    """
    from tqdm.auto import tqdm

    prompts = check_prompts(prompts, batch=videos.shape[0] if isinstance(videos, torch.Tensor) and videos.dim() == 5 else None)
    variants = dict(table8_variants() if variants is None else variants)
    if negatives is None:
        neg = mismatched_indices(prompts)
        text_all = backbone.encode_text(prompts)
    else:
        if isinstance(negatives, str) or len(negatives) != len(prompts):
            raise ValueError(f"negatives: expected one caption per prompt ({len(prompts)}), got "
                             f"{'a str' if isinstance(negatives, str) else len(negatives)}")
        negatives = check_prompts(negatives)
        if any(n == p for n, p in zip(negatives, prompts)):
            raise ValueError("negatives: a mismatched caption equals its video's prompt")
        # One text batch: rows [0, n) are the prompts, rows [n, 2n) their negatives.
        neg = torch.arange(len(prompts), 2 * len(prompts))
        text_all = backbone.encode_text(list(prompts) + list(negatives))
    out: Dict[str, List[List[torch.Tensor]]] = {name: [[], []] for name in variants}
    was_training = backbone.training
    backbone.eval()
    try:
        for start in tqdm(range(0, len(prompts), batch_size), desc="VTM variants", disable=not progress):
            idx = torch.arange(start, min(start + batch_size, len(prompts)))
            video = backbone.encode_video(videos[idx].to(backbone.device))
            pos_text = text_all.index(idx.to(text_all.input_ids.device))
            neg_text = text_all.index(neg[idx].to(text_all.input_ids.device))
            for name, pot in variants.items():
                if pot is None:
                    pos, negp = backbone.match_probability(pos_text, video), backbone.match_probability(neg_text, video)
                else:
                    with patch_cross_attention(backbone, pot):
                        pos, negp = backbone.match_probability(pos_text, video), backbone.match_probability(neg_text, video)
                out[name][0].append(pos.float().cpu())
                out[name][1].append(negp.float().cpu())
    finally:
        backbone.train(was_training)
    return {name: (torch.cat(p), torch.cat(n)) for name, (p, n) in out.items()}
