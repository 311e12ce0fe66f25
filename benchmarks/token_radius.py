"""The low-pass radius of UCC's spectral score, on seeded digits DeiTs: the data behind ``LOW_PASS_RADIUS``.

    PYTHONPATH=src python3 benchmarks/token_radius.py [SEEDS] [OUT.json]   # default 0,1,...,8

A token's spectral score is the energy of its high-pass residual over the patch grid: what is
left once the frequencies of radius ≤ r cycles/patch are removed. The digits DeiT has a 4×4 grid,
where the radii of ``RADII`` give every distinct filter up to the Nyquist axes: r = 0 removes the
grid mean alone, 0.25 (``LOW_PASS_RADIUS``) also the first harmonic along each axis, 0.375 the
diagonal ones too, 0.5 the Nyquist axes as well. Runs the schedule family of ``search bench
tokens`` with UCC at each radius and with ToMe on the models of ``token_seeds.py`` (the same
cached weights) and prints, per point and method, the sum over seeds of each model's best
schedule and over all schedules. Writes every count to OUT (default
benchmarks/results/token-radius-cpu.json).
"""

import math

from torch import Tensor

from hwnas.pruning.token_methods import (LOW_PASS_RADIUS, TokenState, TomeMethod, UccMethod, low_pass_basis,
                                         spectral_energy)
from token_seeds import compare_on_seeds

RADII = (0.0, LOW_PASS_RADIUS, 0.375, 0.5)


class RadiusUcc(UccMethod):
    """UCC whose spectral score removes the frequencies of radius ≤ ``radius`` instead of ``LOW_PASS_RADIUS``."""

    def __init__(self, radius: float):
        super().__init__()
        self.radius = radius

    def spectral_score(self, state: TokenState) -> Tensor:
        side = math.isqrt(state.low_pass.shape[0])  # the digits DeiT's grid is square (4×4)
        return spectral_energy(state.patches, low_pass_basis(side, side, self.radius))


#: (impl, radius or None) -> the token method
METHODS = {**{("hwnas", radius): (lambda radius=radius: RadiusUcc(radius)) for radius in RADII},
           ("tome", None): TomeMethod}


def main() -> None:
    compare_on_seeds("token-radius", METHODS, "low_pass_radius", "r")


if __name__ == "__main__":
    main()
