"""Redundancy-aware selection for UCC, measured on seeded digits DeiTs and not adopted: the data behind the
``token_methods`` docstring's sentence on it.

    PYTHONPATH=src python3 benchmarks/token_redundancy.py [SEEDS] [OUT.json]   # default 0,1,...,8

UCC removes the lowest-scored tokens at a cut. The variant gives a share of each cut's removals to
the most redundant tokens first — ToMe's bipartite choice: of the tokens at even positions, those
whose nearest token at an odd position (cosine of the keys) is nearest, at most half the tokens —
and the rest to the lowest scores; every removed token is fused as in UCC. Runs the schedule family
of ``search bench tokens`` with UCC (share 0), each share of ``SHARES`` and ToMe on the models of
``token_seeds.py`` (the same cached weights) and prints, per point and method, the sum over seeds of
each model's best schedule and over all schedules. The shares were compared on seeds 1–4 and the
best checked on seeds 5–8. Writes every count to OUT (default benchmarks/results/token-redundancy-cpu.json).
"""

import torch.nn.functional as F
from torch import Tensor

from hwnas.kernels.descending_order import descending_order, mixed_scores
from hwnas.pruning.token_methods import TokenState, TomeMethod, UccMethod
from token_seeds import compare_on_seeds

SHARES = (0.25, 0.5, 0.75, 1.0)


class RedundantFirstUcc(UccMethod):
    """UCC whose cuts give ``share`` of their removals to the most redundant tokens, the rest to the lowest scores."""

    def __init__(self, share: float):
        super().__init__()
        self.share = share
        self._removed = 0

    def reduce(self, state: TokenState, keep: int) -> TokenState:
        self._removed = state.patches.shape[1] - keep  # what ``ranking`` gives the share of, in this cut
        return super().reduce(state, keep)

    def ranking(self, state: TokenState) -> Tensor:
        count = round(self.share * self._removed)
        if not count:
            return super().ranking(state)
        scores = mixed_scores(state.attention_sum, state.spectral, self.spectral_weight)
        return descending_order(redundant_last(scores, F.normalize(state.keys, dim=-1), count), self.use_triton)


def redundant_last(scores: Tensor, metric: Tensor, count: int) -> Tensor:
    """``scores [B, N]`` (non-negative) with the ``count`` most redundant tokens (ToMe's choice) set to -1."""
    nearest = (metric[:, ::2] @ metric[:, 1::2].transpose(1, 2)).max(dim=-1).values
    chosen = nearest.topk(min(count, nearest.shape[1]), dim=1).indices * 2
    return scores.scatter(1, chosen, -1.0)


#: (impl, merge share or None) -> the token method
METHODS = {("hwnas", 0.0): UccMethod, **{("hwnas", share): (lambda share=share: RedundantFirstUcc(share))
                                         for share in SHARES}, ("tome", None): TomeMethod}


def main() -> None:
    compare_on_seeds("token-redundancy", METHODS, "merge_share", "share")


if __name__ == "__main__":
    main()
