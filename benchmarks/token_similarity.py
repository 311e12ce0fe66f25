"""What UCC fuses a pruned token by, on seeded digits DeiTs: the cosine of the attention keys (UCC's,
as ToMe's) against that of the token features.

    PYTHONPATH=src python3 benchmarks/token_similarity.py [SEEDS] [OUT.json]   # default 0,1,...,8

Each pruned token joins the kept token most like it. UCC judges likeness as ToMe does, by the
cosine of the attention keys of the block before the cut (mean over heads); the variant uses the
tokens themselves, the residual stream entering that block. Runs the schedule family of ``search
bench tokens`` with both and with ToMe on the models of ``token_seeds.py`` (the same cached
weights) and prints, per point and method, the sum over seeds of each model's best schedule and over
all schedules. Writes every count to OUT (default benchmarks/results/token-similarity-cpu.json).
"""
import torch.nn.functional as F
from torch import Tensor

from hwnas.pruning.token_methods import TokenState, TomeMethod, UccMethod
from token_seeds import compare_on_seeds


class FeatureSimilarityUcc(UccMethod):
    """UCC that fuses each pruned token into the kept token whose features, not keys, are most like its own."""

    def similarity_metric(self, state: TokenState) -> Tensor:
        return F.normalize(state.patches, dim=-1)


#: (impl, the vectors compared or None) -> the token method
METHODS = {("hwnas", "keys"): UccMethod, ("hwnas", "features"): FeatureSimilarityUcc, ("tome", None): TomeMethod}


def main() -> None:
    compare_on_seeds("token-similarity", METHODS, "similarity", "by")


if __name__ == "__main__":
    main()
