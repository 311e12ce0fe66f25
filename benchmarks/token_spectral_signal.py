"""Whose spectral energy UCC scores, on seeded digits DeiTs: the token features (UCC's) against the
attention keys, 6–12x narrower on deit_small/base and so as much cheaper to filter.

    PYTHONPATH=src python3 benchmarks/token_spectral_signal.py [SEEDS] [OUT.json]   # default 0,1,...,8

At the first cut UCC measures each patch's high-frequency energy over the grid. It filters the
residual stream entering the block before the cut (C channels); the variant filters that block's
attention keys, mean over heads (D = 64), at the β of ``SPECTRAL_WEIGHT`` and at 0.5 and 0.9 (an
earlier check of the keys, on one model at the β of that time, went up to 0.5). Runs the schedule
family of ``search bench tokens`` with each and with ToMe on the models of ``token_seeds.py`` (the
same cached weights) and prints, per point and method, the sum over seeds of each model's best
schedule and over all schedules. Writes every count to OUT (default
benchmarks/results/token-spectral-signal-cpu.json).
"""
from torch import Tensor

from hwnas.pruning.token_methods import SPECTRAL_WEIGHT, TokenState, TomeMethod, UccMethod, spectral_energy
from token_seeds import compare_on_seeds


class KeysSpectralUcc(UccMethod):
    """UCC whose spectral score filters the attention keys of the block before the first cut, not the features."""

    def spectral_score(self, state: TokenState) -> Tensor:
        return spectral_energy(state.keys, state.low_pass)


#: (impl, "signal β") -> the token method
METHODS = {("hwnas", f"features {SPECTRAL_WEIGHT}"): UccMethod,
           **{("hwnas", f"keys {weight}"): (lambda weight=weight: KeysSpectralUcc(weight))
              for weight in (0.5, SPECTRAL_WEIGHT, 0.9)},
           ("tome", None): TomeMethod}


def main() -> None:
    compare_on_seeds("token-spectral-signal", METHODS, "spectral_signal", "of")


if __name__ == "__main__":
    main()
