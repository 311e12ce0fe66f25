"""How a block's token count is reduced: the UCC method and the baselines it is compared with.

Every method sees a ``TokenState`` (the tokens, what earlier blocks observed about them) and
returns a state with ``keep`` patch tokens; prefix tokens (class, registers) always pass.

* ``ucc`` (hwnas's method, after UCC): each token's score is ``(1 - β)·spatial + β·spectral``.
  *Spatial* is the class token's attention to it, averaged over heads and accumulated down the
  cascade (``history="cuts"``): each cut adds the attention of the block before it to the sum a
  token carries from the earlier cuts (a fused token inherits what it absorbed), so from the second
  cut on a token's fate rests on its history, not on one block. ``history="blocks"`` (the method
  ``ucc-blocks``) adds every block from the first instead; ``history="last"``, the block before the
  cut alone, is an ablation. *Spectral* is its high-frequency energy, measured once, at the first
  cut, while the tokens are still the patches of the grid: a 2-D FFT filter over the grid (applied
  as a projection, ``low_pass_basis``) removes the frequencies of radius ≤ ``LOW_PASS_RADIUS``
  cycles/patch, and a token's energy is that of its residual — tokens on edges and strokes score
  high, flat background low. Both parts are normalised to sum to one per image and mixed with
  β = ``SPECTRAL_WEIGHT`` (a space can set or search it: the ``spectral_weight`` transform; until
  hwnas 0.2.0 β was 0.3, and exports of those versions load with it).

  The best ``keep`` tokens are kept and every pruned token is fused into its most similar kept token
  (cosine of attention keys): a size-weighted mean, and the kept token inherits the pruned one's
  accumulated attention and spectral energy, so the cascade remembers what a fused token absorbed.
  Later blocks use proportional attention (``+ log size`` on the keys), so a fused token counts for
  what it holds.

  Each choice was measured against its alternatives on digits DeiTs, in right answers on the 720
  held-out images by each model's best schedule at −35 % / −50 % FLOPs (the ``bench tokens``
  criterion), mostly on the nine models of ``benchmarks/token_seeds.py`` (seeds 0–8, trained on an
  Intel Xeon; each choice made on seeds 1–4 and checked on the others). Records are under
  ``benchmarks/results/`` (``*-cpu-xeon-2threads.json``), the scripts under ``benchmarks/``:

  - β = 0.8 (``token_seeds.py``): 6336 / 6104, ToMe 6313 / 6049, β = 0.3 6312 / 6075, attention
    alone 6283 / 6016, spectral alone 6321 / 6095. Chosen on seeds 1–4 (both points summed: 0.7–0.9
    5490–5495, 0.3 5469, attention alone 5420, spectral alone 5479, ToMe 5459); on seeds 5–8 0.8
    scores 2824 / 2727, 0.3 2807 / 2715, ToMe 2809 / 2701. On nine models trained on an AMD EPYC:
    0.8 6319 / 6110, ToMe 6316 / 6088, 0.3 6312 / 6104, attention alone 6281 / 6066. Which β is best
    differs from model to model (on the built-in trained on an Intel Xeon, 0–1 all score within 6
    images of each other).
  - The history ``cuts``, not ``blocks`` (the built-in, 11 schedules: 7589 against 7581 right answers):
    as accurate and cheaper, as it reads the class-attention row only in the blocks before its cuts
    (deit_small at −50 %, 2-core Xeon, paired against ToMe: 0.98x / 0.99x at batch 1 / 8, against
    0.96x / 0.97x).
  - ``LOW_PASS_RADIUS`` = 0.25 (``token_radius.py``, on the 4×4 grid): 6336 / 6104, against the grid
    mean alone (0) 6319 / 6065, the diagonal harmonics too (0.375) 6319 / 6101, up to the Nyquist
    axes (0.5) 6322 / 6095.
  - The spectral energy of the features, measured once. Of the attention keys, 6–12x narrower
    (``token_spectral_signal.py``, β = 0.8): 6328 / 6123, worse at −35 % on the held-out seeds (3516 against
    3529), at least ToMe's there on 6 models of 9 against 8. Measured again at every cut, each fused
    token painted back onto the patches it covers (the built-in, every block's attention): 7582
    against 7581 over 11 schedules, and 0.85–1.0 ms more per later cut on deit_small at batch 8.
  - Fusing by the keys, as ToMe does. By the features (``token_similarity.py``): 6334 / 6158, better at
    −50 % but not at −35 % on the held-out seeds (3522 against 3529), with similarity products 6–12x
    larger on deit_small/base.
  - Selecting by score alone. Redundancy-aware selection, a share of each cut's removals given to
    ToMe's most redundant tokens first (``token_redundancy.py``, share 0.75): 6332 / 6144; it lost at
    −35 % on the held-out seeds 5–8 (2816 against 2824) and adds ToMe's similarity matmul to every cut.
  - No better on one model (the built-in trained on an AMD EPYC, calibration split, β = 0.3: 2876
    over 11 schedules): weighing a pruned token by its score relative to the weakest kept one
    (2868), a softmax over similarities instead of the most similar token (≤ 2870), the keys'
    spectral energy at β ≤ 0.5 (≤ 2862), the features' through a fixed random projection to 32 or
    64 channels (2869–2876).
  - One β for every model, not one chosen per model on its calibration images
    (``token_beta_calibration.py``, from ``token_seeds.py``'s records: the calibration split chooses
    the schedule, and β, the test split scores, ToMe's schedule chosen alike). Of 4050 test images
    over nine models, Xeon: calibrated 3937 / 3805, β = 0.8 3952 / 3777, ToMe 3933 / 3754; EPYC:
    3951 / 3816, 3951 / 3809, ToMe 3942 / 3793. Better at −50 %, not at −35 %, where it is at least
    ToMe's on 5 and 6 models of 9 against the fixed β's 6 and 7.
* ``tome``: ToMe's bipartite soft matching (training-free): alternate tokens form two sets, each
  token of A its most similar of B, the most similar pairs are merged (size-weighted mean),
  repeated until ``keep`` remain (the keys are merged too when another round follows);
  proportional attention.
* ``evit``: EViT: keep the ``keep - 1`` tokens the class token attends to most (previous block)
  and fuse the rest into one token, weighted by that attention. No size bias (as in EViT).
* ``random``: keep ``keep`` tokens drawn at random (a fixed seed per shape, drawn once: reproducible).

The gather of kept tokens and the weighted scatter-add of fused ones run on the Triton kernels
of ``hwnas.kernels.gather_scatter`` on CUDA (torch indexing on the CPU and under autograd), and so
does UCC's ranking, its score mixed in the same launch (``hwnas.kernels.descending_order``), and
its class-attention row (``hwnas.kernels.class_attention``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from hwnas.errors import HwnasError
from hwnas.kernels.descending_order import descending_order, mixed_descending_order, scaled_to_one
from hwnas.kernels.gather_scatter import gather_rows, scatter_add_rows_
from hwnas.kernels.launches import setup_work

#: β: the weight of the spectral score against the accumulated attention (see the module docstring)
SPECTRAL_WEIGHT = 0.8
#: per earlier hwnas version, the β its UCC methods scored with where the space did not set one
EARLIER_SPECTRAL_WEIGHT = {"0.1.0": 0.3, "0.2.0": 0.3}
#: frequencies (cycles per patch) at or below this radius are "low" and removed by the high-pass
LOW_PASS_RADIUS = 0.25
#: whose class attention a UCC cut ranks by: the block before each cut so far (summed), every block from
#: the first, or the block before this cut alone (see the module docstring)
HISTORIES = ("cuts", "blocks", "last")
DEFAULT_HISTORY = "cuts"


@dataclass(frozen=True)
class TokenState:
    """The tokens between two blocks and what the blocks so far observed about the patch tokens.

    ``x [B, T, C]`` holds ``prefix`` tokens then ``T - prefix`` patch tokens. ``low_pass [P, r]`` is the
    low-pass basis of the model's patch grid (``low_pass_basis``; None where the method scores no
    spectral energy), a constant that ``TokenKeepBlocks`` holds as a buffer. The others describe
    the patch tokens only: ``size [B, N]`` how many patches each stands for (None: all 1),
    ``attention [B, N]`` the class token's attention in the last observed block,
    ``attention_sum`` its sum over the observed blocks (a running sum that the next observed block
    adds to in place: a cascade holds one state at a time), ``keys [B, N, D]``
    the last block's attention keys (mean over heads), ``spectral [B, N]`` the high-frequency
    energy measured at the first cut (summed over the tokens a fused token absorbed).
    """

    x: Tensor
    prefix: int
    low_pass: Tensor | None = None
    size: Tensor | None = None
    attention: Tensor | None = None
    attention_sum: Tensor | None = None
    keys: Tensor | None = None
    spectral: Tensor | None = None

    @property
    def patches(self) -> Tensor:
        return self.x[:, self.prefix:]

    def with_patches(self, patches: Tensor, **changes) -> "TokenState":
        return replace(self, x=torch.cat([self.x[:, :self.prefix], patches], dim=1), **changes)


class TokenMethod:
    """A way to cut the patch tokens down to ``keep``; subclasses say what they need observed."""

    name: str = ""
    needs_attention = False      # the class token's attention in the block before a cut
    needs_keys = False           # the attention keys in the block before a cut
    accumulates = False          # observe every block from the first, not only the one before each cut
    needs_low_pass = False       # the low-pass basis of the patch grid (spectral scores)
    proportional = False         # later blocks add log(size) to the attention logits

    def __init__(self, use_triton: bool | None = None):
        self.use_triton = use_triton

    def running_attention(self, state: TokenState) -> Tensor | None:
        """Where the next observed block adds its attention row in place (a running sum), or None: a fresh row."""
        return None

    def observe(self, state: TokenState, attention: Tensor | None, keys: Tensor | None) -> TokenState:
        """Record what one block saw: keys [B, N, D] and attention [B, N], its class-attention row
        (already added to ``running_attention``, when that is not None)."""
        return replace(state, attention=attention, keys=keys)

    def reduce(self, state: TokenState, keep: int) -> TokenState:
        raise NotImplementedError


class UccMethod(TokenMethod):
    name = "ucc"
    needs_attention = needs_keys = proportional = True

    def __init__(self, spectral_weight: float = SPECTRAL_WEIGHT, history: str = DEFAULT_HISTORY,
                 use_triton: bool | None = None):
        """``history`` says whose class attention a cut ranks by (``HISTORIES``; the module docstring)."""
        super().__init__(use_triton)
        if not 0.0 <= spectral_weight <= 1.0:
            raise HwnasError(f"spectral weight {spectral_weight} must be in [0, 1]")
        if history not in HISTORIES:
            raise HwnasError(f"unknown UCC history '{history}' (known: {', '.join(HISTORIES)})")
        self.spectral_weight = spectral_weight
        self.history = history

    @property
    def accumulates(self) -> bool:
        return self.history == "blocks"

    @property
    def needs_low_pass(self) -> bool:
        return self.spectral_weight > 0.0

    @property
    def cumulative(self) -> bool:
        """Whether a cut ranks by the sum over earlier observations (kept and inherited through fusion)."""
        return self.history != "last"

    def running_attention(self, state: TokenState) -> Tensor | None:
        return state.attention_sum if self.cumulative else None

    def observe(self, state: TokenState, attention: Tensor | None, keys: Tensor | None) -> TokenState:
        if self.cumulative:  # the block added its row to the running sum (or, the first, started it)
            return replace(state, attention_sum=attention, keys=keys)
        return replace(state, attention=attention, keys=keys)

    def ranking(self, state: TokenState) -> Tensor:
        """The patch tokens best first [B, N] by the combined score (each part scaled to sum to one per image).

        Scaled per image, the accumulated sum ranks as the running mean does. On CUDA one kernel mixes and ranks.
        """
        spatial = state.attention_sum if self.cumulative else state.attention
        if self.spectral_weight == 0.0:
            return descending_order(scaled_to_one(spatial), self.use_triton)
        return mixed_descending_order(spatial, state.spectral, self.spectral_weight, self.use_triton)

    def spectral_score(self, state: TokenState) -> Tensor:
        """Each patch token's high-frequency energy [B, N], taken at the first cut (the tokens are the grid's patches)
        from the token features; later cuts carry it through fusion."""
        return spectral_energy(state.patches, state.low_pass)

    def similarity_metric(self, state: TokenState) -> Tensor:
        """The unit vectors [B, N, D] whose dot products say which kept token a pruned one is most like: the keys."""
        return F.normalize(state.keys, dim=-1)

    def reduce(self, state: TokenState, keep: int) -> TokenState:
        if self.spectral_weight > 0.0 and state.spectral is None:  # the first cut: the tokens are the grid's patches
            state = replace(state, spectral=self.spectral_score(state))
        # the kept tokens, best first, then the pruned ones: every per-token table is gathered once. Past the
        # position embedding a ViT's blocks do not see token order, so the kept ones need no sort back
        order = self.ranking(state)
        metric = gather_rows(self.similarity_metric(state), order, self.use_triton)
        target = (metric[:, keep:] @ metric[:, :keep].transpose(1, 2)).max(dim=-1).indices  # most similar kept token [B, P]
        rows = gather_rows(state.patches, order, self.use_triton)
        size, merged_size, history, spectral = _carried_through_cut(state, order, keep, target)
        merged = _fuse(rows, size, merged_size, keep, target, self.use_triton)
        return state.with_patches(merged, size=merged_size, attention_sum=history, spectral=spectral, keys=None,
                                  attention=None)


class UccEveryBlockMethod(UccMethod):
    """UCC ranking by the attention of every block before the cut (``history="blocks"``): 0–2 % slower."""

    name = "ucc-blocks"

    def __init__(self, spectral_weight: float = SPECTRAL_WEIGHT, use_triton: bool | None = None):
        super().__init__(spectral_weight, "blocks", use_triton)


class TomeMethod(TokenMethod):
    name = "tome"
    needs_keys = proportional = True

    def reduce(self, state: TokenState, keep: int) -> TokenState:
        patches, size, keys = state.patches, _sizes(state, state.patches), state.keys
        while patches.shape[1] > keep:
            remove = min(patches.shape[1] - keep, patches.shape[1] // 2)
            another_round = patches.shape[1] - remove > keep
            patches, size, keys = _bipartite_merge(patches, size, keys, remove, self.use_triton, another_round)
        return state.with_patches(patches, size=size, keys=None, attention=None)


class EvitMethod(TokenMethod):
    name = "evit"
    needs_attention = True

    def reduce(self, state: TokenState, keep: int) -> TokenState:
        patches, attention = state.patches, state.attention
        order = attention.argsort(dim=1, descending=True)
        kept, pruned = order[:, :keep - 1].sort(dim=1).values, order[:, keep - 1:]
        weight = attention.gather(1, pruned)
        weight = weight / weight.sum(dim=1, keepdim=True).clamp_min(1e-12)
        fused = (gather_rows(patches, pruned, self.use_triton) * weight[..., None].to(patches.dtype)).sum(1, keepdim=True)
        return state.with_patches(torch.cat([gather_rows(patches, kept, self.use_triton), fused], dim=1),
                                  keys=None, attention=None)


class RandomMethod(TokenMethod):
    name = "random"
    SEED = 0

    def reduce(self, state: TokenState, keep: int) -> TokenState:
        patches = state.patches
        kept = _random_rows(*patches.shape[:2], keep, self.SEED, str(patches.device))
        return state.with_patches(gather_rows(patches, kept, self.use_triton))


@functools.lru_cache(maxsize=16)
@setup_work
def _random_rows(batch: int, tokens: int, keep: int, seed: int, device: str) -> Tensor:
    """``keep`` of ``tokens`` rows per image [B, keep], in order, drawn with ``seed + tokens``: a function of the
    shapes, so it is drawn once (a CUDA graph's capture then finds it made)."""
    with torch.inference_mode(False), torch.no_grad():  # cached: usable in and out of inference mode
        generator = torch.Generator(device=device).manual_seed(seed + tokens)
        draw = torch.rand(batch, tokens, generator=generator, device=device)
        return draw.topk(keep, dim=1).indices.sort(dim=1).values


TOKEN_METHODS: dict[str, type[TokenMethod]] = {m.name: m for m in (UccMethod, UccEveryBlockMethod, TomeMethod,
                                                                     EvitMethod, RandomMethod)}
DEFAULT_TOKEN_METHOD = "ucc"


def token_method(name: str, **options) -> TokenMethod:
    """The method called ``name`` (``ucc``, ``ucc-blocks``, ``tome``, ``evit``, ``random``)."""
    try:
        return TOKEN_METHODS[name](**options)
    except KeyError:
        raise HwnasError(f"unknown token method '{name}' (known: {', '.join(TOKEN_METHODS)})") from None


def spectral_energy(patches: Tensor, low_pass: Tensor) -> Tensor:
    """Per patch token [B, P] (token p is patch p of the grid), the energy of its high-pass residual (fp32).

    With U = ``low_pass`` [P, r], the low-pass basis of the grid (``low_pass_basis``), the grid signal
    x has the residual x - U (Uᵀ x): two thin matmuls, the second fused with the subtraction. They
    run in fp32 on the CPU and in the tokens' own precision on CUDA (fp16/bf16 on the tensor cores;
    in fp32 the second product alone took 52 µs of deit_base's forward at batch 64 on an H100); the
    energy is summed in fp32.
    """
    x = patches if patches.is_cuda else patches.float()
    basis = low_pass.to(x.dtype)
    if x.shape[1] != basis.shape[0]:
        raise ValueError(f"spectral_energy needs one token per patch of the grid ({basis.shape[0]}), got {x.shape[1]}")
    residual = torch.baddbmm(x, basis.expand(len(x), -1, -1), basis.T @ x, alpha=-1)
    return torch.linalg.vector_norm(residual, dim=-1, dtype=torch.float32).square()


@functools.lru_cache(maxsize=16)
def low_pass_basis(height: int, width: int, radius: float = LOW_PASS_RADIUS) -> Tensor:
    """An orthonormal basis [P, r] (P = H·W) of the grid signals that have only low frequencies.

    The low-pass filter (2-D FFT, keep the frequencies of radius ≤ ``radius`` cycles/patch,
    inverse FFT) is an orthogonal projection, so the high-pass residual of a grid
    signal x is ``x - U Uᵀ x``: two thin matmuls (r = 37 of P = 196 on a 14×14 grid) instead of the
    dense [P, P] filter or two FFTs, which on small grids are mostly launch and copy overhead.
    Built once per grid by filtering every unit impulse, in fp32 on the CPU: a model holds it as a
    buffer (``TokenKeepBlocks.low_pass``), which moves with the model.
    """
    positions = height * width
    with torch.inference_mode(False), torch.no_grad():  # cached: usable in and out of inference mode
        impulses = torch.eye(positions, dtype=torch.float64).reshape(positions, height, width)
        fy = torch.fft.fftfreq(height, dtype=torch.float64)[:, None]
        fx = torch.fft.rfftfreq(width, dtype=torch.float64)[None, :]
        keep = ((fy ** 2 + fx ** 2).sqrt() <= radius).to(torch.float64)
        low_pass = torch.fft.irfft2(torch.fft.rfft2(impulses) * keep, s=(height, width)).reshape(positions, positions)
        eigenvalues, eigenvectors = torch.linalg.eigh((low_pass + low_pass.T) / 2)  # eigenvalues are 0 or 1
        return eigenvectors[:, eigenvalues > 0.5].contiguous().float()


def _carried_through_cut(state: TokenState, order: Tensor, keep: int, target: Tensor
                         ) -> tuple[Tensor | None, Tensor, Tensor | None, Tensor | None]:
    """The per-token sums a UCC cut carries through fusion (size, accumulated attention, spectral energy), moved
    as one table [K, B, N]: one gather puts them in ``order``, one scatter-add gives each kept token its own plus
    those of the tokens fused into it.

    Returns the sizes in ``order`` [B, N] (None while every token is one patch), then, after the cut, [B, keep]:
    the sizes, the attention sums and the spectral energies (None where the state has none).
    """
    sums = [_sizes(state, state.patches)] + [t for t in (state.attention_sum, state.spectral) if t is not None]
    table = torch.stack(sums).gather(2, order.expand(len(sums), -1, -1))
    merged = table[..., :keep].scatter_add(2, target.expand(len(sums), -1, -1), table[..., keep:])
    history = None if state.attention_sum is None else merged[1]
    if history is not None and torch.is_grad_enabled():  # later blocks add to it in place, which autograd forbids
        history = history.clone()                          # on storage that the sizes' saved views share
    spectral = None if state.spectral is None else merged[-1]
    return (None if state.size is None else table[0]), merged[0], history, spectral


def _sizes(state: TokenState, patches: Tensor) -> Tensor:
    if state.size is not None:
        return state.size
    return patches.new_ones(patches.shape[:2], dtype=torch.float32)


def _fuse(rows: Tensor, size: Tensor | None, merged_size: Tensor, keep: int, target: Tensor,
          use_triton: bool | None) -> Tensor:
    """The first ``keep`` of ``rows [B, N, C]`` as size-weighted means with the others fused into them.
    ``rows`` is consumed (its kept part accumulates in place).

    ``size [B, N]`` is how many patches each row stands for (None: one each), ``merged_size [B, keep]``
    how many the kept rows stand for after the fusion; ``target [B, N - keep]`` the kept row each other row joins.
    """
    kept, pruned = rows[:, :keep], rows[:, keep:]
    if size is None:
        scatter_add_rows_(kept, target, pruned, use_triton=use_triton)
    else:
        kept = kept * size[:, :keep, None].to(rows.dtype)
        scatter_add_rows_(kept, target, pruned, size[:, keep:].to(rows.dtype), use_triton)
    return kept / merged_size[..., None].to(rows.dtype)


def _bipartite_merge(patches: Tensor, size: Tensor, keys: Tensor, remove: int, use_triton: bool | None,
                     merge_keys: bool = True) -> tuple[Tensor, Tensor, Tensor | None]:
    """One round of ToMe: merge ``remove`` tokens of set A (even positions) into set B (odd).

    Returns the tokens, their sizes and, with ``merge_keys`` (another round follows), their keys.
    """
    metric = F.normalize(keys, dim=-1)
    similarity = metric[:, ::2] @ metric[:, 1::2].transpose(1, 2)  # [B, A, B]
    best, partner = similarity.max(dim=-1)
    order = best.argsort(dim=1, descending=True)
    source, unmerged = order[:, :remove], order[:, remove:]
    target = partner.gather(1, source)

    def merge(values: Tensor, values_size: Tensor) -> tuple[Tensor, Tensor]:
        side_a, side_b = values[:, ::2], values[:, 1::2]
        size_a, size_b = values_size[:, ::2], values_size[:, 1::2]
        total_b = side_b * size_b[..., None].to(values.dtype)
        total_b = scatter_add_rows_(total_b, target, gather_rows(side_a, source, use_triton),
                                    size_a.gather(1, source).to(values.dtype), use_triton)
        merged_size_b = size_b.scatter_add(1, target, size_a.gather(1, source))
        merged = torch.cat([gather_rows(side_a, unmerged, use_triton), total_b / merged_size_b[..., None].to(values.dtype)], 1)
        return merged, torch.cat([size_a.gather(1, unmerged), merged_size_b], dim=1)

    merged, merged_size = merge(patches, size)
    merged_keys = merge(keys, size)[0] if merge_keys else None
    return merged, merged_size, merged_keys
