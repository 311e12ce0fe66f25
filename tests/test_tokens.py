"""Token-keep schedules on timm ViTs: identity at 1.0, the right counts, what each method keeps and fuses, errors."""

import copy
import inspect
from dataclasses import replace

import pytest
import timm
import torch

from hwnas.errors import HwnasError
from hwnas.hwprofiles.predictor import trace_ops
from hwnas.pruning import token_methods
from hwnas.pruning.token_methods import (LOW_PASS_RADIUS, TOKEN_METHODS, EvitMethod, RandomMethod, TokenState, TomeMethod,
                                         UccMethod, _random_rows, low_pass_basis, spectral_energy,
                                         token_method)
from hwnas.pruning.tokens import apply_token_keep, keep_counts, log_sizes, observed_block


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, num_classes=10).eval()


def test_all_ones_is_exactly_timm(vit):
    x = torch.randn(2, 3, 64, 64)
    pruned = apply_token_keep(copy.deepcopy(vit), {b: 1.0 for b in range(1, len(vit.blocks))})
    with torch.inference_mode():
        assert torch.equal(vit(x), pruned(x))
    assert type(pruned.blocks) is type(vit.blocks)


@pytest.mark.parametrize("method", list(TOKEN_METHODS))
def test_blocks_process_the_scheduled_token_counts(vit, method):
    schedule = {2: 0.5, 3: 0.5, 5: 0.25}
    assert keep_counts(vit, schedule) == [None, None, 8, 8, None, 4] + [None] * 6
    pruned = apply_token_keep(copy.deepcopy(vit), schedule, method)
    assert pruned.blocks.prune_to[:6] == [None, None, 8, None, None, 4]
    seen = []
    for block in pruned.blocks:  # norm1 sees every block's input, whichever path runs the block
        block.norm1.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))
    with torch.inference_mode():
        out = pruned(torch.randn(3, 3, 64, 64))
    assert out.shape == (3, 10) and torch.isfinite(out).all()
    assert seen == [17, 17, 9, 9, 9] + [5] * 7  # 16 patches + class token


def test_what_each_method_observes(vit):
    schedule = {2: 0.5, 5: 0.25}
    blocks = {m: apply_token_keep(copy.deepcopy(vit), schedule, m).blocks for m in TOKEN_METHODS}
    assert blocks["ucc"].observes[:6] == [False, True, False, False, True, False]  # the block before each cut
    assert blocks["tome"].observes[:6] == [False, True, False, False, True, False]
    assert blocks["ucc-blocks"].observes[:6] == [True] * 5 + [False]  # from block 0 to the last cut
    assert blocks["random"].observes[:6] == [False] * 6
    assert blocks["ucc"].size_bias[:6] == [False, False, True, True, True, True]  # proportional after the first cut
    assert not any(blocks["evit"].size_bias)


def test_observed_block_matches_timm_and_explicit_attention(vit):
    block = vit.blocks[1]
    x = torch.randn(2, 17, vit.embed_dim)
    with torch.inference_mode():
        out, attention, keys = observed_block(block, x, 1, want_attention=True, want_keys=True)
        assert torch.allclose(out, block(x), atol=1e-5)
        ones, _, _ = observed_block(block, x, 1, log_sizes(torch.ones(2, 16), 1, x.dtype))  # size 1: no bias
        assert torch.allclose(ones, block(x), atol=1e-5)
        attn = block.attn
        q, k, _ = attn.qkv(block.norm1(x)).reshape(2, 17, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        probs = ((q @ k.transpose(-2, -1)) * attn.scale).softmax(-1)  # [B, H, N, N]
    assert torch.allclose(attention, probs[:, :, 0, 1:].mean(1), atol=1e-6)
    assert torch.allclose(keys, k.mean(1)[:, 1:], atol=1e-6)


def test_proportional_attention_equals_duplicated_tokens(vit):
    """A token of size 2 attends like two identical copies of it: what ToMe's size bias means."""
    block = vit.blocks[3]
    x = torch.randn(1, 5, vit.embed_dim)
    duplicated = torch.cat([x, x[:, 4:]], dim=1)
    with torch.inference_mode():
        out, _, _ = observed_block(block, x, 1, log_sizes(torch.tensor([[1.0, 1.0, 1.0, 2.0]]), 1, x.dtype))
        reference = block(duplicated)
    assert torch.allclose(out, reference[:, :5], atol=1e-5)


def _state(patches, **fields):
    cls = torch.zeros(patches.shape[0], 1, patches.shape[2])
    return TokenState(x=torch.cat([cls, patches], 1), prefix=1, low_pass=low_pass_basis(2, 2), **fields)


def test_ucc_keeps_the_best_scored_tokens_and_fuses_the_rest_into_the_most_similar():
    patches = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.9, 0.1], [0.0, 3.0]]])
    keys = patches.clone()  # similarity follows the features: patch 2 is like patch 0, patch 3 like patch 1
    attention = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    state = _state(patches, attention=attention, attention_sum=attention, keys=keys)
    out = UccMethod(spectral_weight=0.0).reduce(state, keep=2)
    expected = torch.stack([(patches[0, 0] + patches[0, 2]) / 2, (patches[0, 1] + patches[0, 3]) / 2])
    assert torch.allclose(out.patches[0], expected, atol=1e-6)  # size-weighted means
    assert torch.allclose(out.size[0], torch.tensor([2.0, 2.0]))
    # the cascade: a kept token inherits the accumulated score of what it absorbed
    assert torch.allclose(out.attention_sum[0], torch.tensor([0.5 + 0.15, 0.3 + 0.05]))
    assert torch.equal(out.x[:, :1], state.x[:, :1])  # class token untouched


@pytest.mark.parametrize("sized", [False, True])
def test_ucc_reduce_matches_a_token_by_token_reference(sized):
    """A batch of images, after an earlier cut (sizes, carried spectral energy) or before the first:
    every fused token, size and inherited score as written out one image and one token at a time."""
    generator = torch.Generator().manual_seed(1)
    batch, count, channels, keep = 3, 9, 5, 4
    patches = torch.randn(batch, count, channels, generator=generator)
    keys = torch.randn(batch, count, 3, generator=generator)
    history = torch.rand(batch, count, generator=generator)
    size = torch.randint(1, 4, (batch, count), generator=generator).float() if sized else None
    spectral = torch.rand(batch, count, generator=generator) if sized else None
    state = replace(_state(patches, attention_sum=history, keys=keys, size=size, spectral=spectral),
                    low_pass=low_pass_basis(3, 3))
    method = UccMethod(spectral_weight=0.3)
    out = method.reduce(state, keep)
    if spectral is None:  # the first cut measures it
        spectral = spectral_energy(patches, low_pass_basis(3, 3))
    score = 0.7 * history / history.sum(1, keepdim=True) + 0.3 * spectral / spectral.sum(1, keepdim=True)
    size = torch.ones(batch, count) if size is None else size
    for b in range(batch):
        kept = score[b].argsort(descending=True)[:keep].tolist()  # best first
        new_of = {k: i for i, k in enumerate(kept)}
        unit = torch.nn.functional.normalize(keys[b], dim=-1)
        for n in range(count):
            if n not in new_of:
                new_of[n] = int((unit[kept] @ unit[n]).argmax())
        for i, k in enumerate(kept):
            members = [n for n in range(count) if new_of[n] == i]
            total = sum(size[b, n] for n in members)
            mean = sum(size[b, n] * patches[b, n] for n in members) / total
            torch.testing.assert_close(out.patches[b, i], mean)
            torch.testing.assert_close(out.size[b, i], total)
            torch.testing.assert_close(out.attention_sum[b, i], sum(history[b, n] for n in members))
            torch.testing.assert_close(out.spectral[b, i], sum(spectral[b, n] for n in members))


def test_ucc_measures_the_spectral_energy_once(monkeypatch):
    """The first cut measures it on the grid's patches; later cuts use what the fused tokens carry."""
    torch.manual_seed(0)
    patches = torch.randn(1, 16, 4)
    state = replace(_state(patches, attention_sum=torch.rand(1, 16), keys=torch.randn(1, 16, 3)),
                    low_pass=low_pass_basis(4, 4))
    method = UccMethod()
    first = method.reduce(state, keep=8)
    assert torch.allclose(first.spectral.sum(), spectral_energy(patches, low_pass_basis(4, 4)).sum())  # nothing is lost by fusing

    def measure_again(*args):
        raise AssertionError("measured again after the first cut")

    monkeypatch.setattr("hwnas.pruning.token_methods.spectral_energy", measure_again)
    second = method.reduce(replace(first, keys=torch.randn(1, 8, 3)), keep=4)
    assert second.spectral.shape == (1, 4) and torch.allclose(second.spectral.sum(), first.spectral.sum())


def test_ucc_scores_accumulate_over_blocks():
    """One block's idiosyncrasy does not decide: the running mean of the attention does."""
    method = UccMethod(spectral_weight=0.0)
    keys = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 0.2], [1.0, 0.1]]])  # tokens 2 and 3 resemble token 0
    state = _state(torch.randn(1, 4, 2), keys=keys)
    for attention in [[0.45, 0.35, 0.15, 0.05]] * 4 + [[0.0, 0.0, 0.1, 0.9]]:  # the last block alone would keep 3, 2
        running = method.running_attention(state)  # as a block does: its row is added to the running sum
        row = torch.tensor([attention])
        state = method.observe(state, row if running is None else running.add_(row), keys)
    out = method.reduce(state, keep=2)
    # tokens 0 and 1 stay and 2, 3 join 0 (had 2 and 3 stayed, 0 would have joined 3 and 1 joined 2: sizes [2, 2])
    assert torch.allclose(out.size[0], torch.tensor([3.0, 1.0]))
    assert torch.allclose(out.attention_sum[0], torch.tensor([1.8 + 0.7 + 1.1, 1.4]))


@pytest.mark.parametrize("history", ["cuts", "blocks", "last"])
def test_each_cut_ranks_by_its_history_of_class_attention(vit, history, monkeypatch):
    """In the model: what a cut ranks by is the class-attention rows of the blocks its history names,
    recomputed here from each block's input: the block before this cut (``last``), plus the sum the
    tokens inherited from the previous cut (``cuts``), or every block since the previous cut (``blocks``)."""
    schedule = {2: 0.5, 5: 0.25}
    model = apply_token_keep(copy.deepcopy(vit), schedule, UccMethod(history=history, use_triton=False))
    inputs, cuts = {}, []
    for index, block in enumerate(model.blocks):
        block.norm1.register_forward_pre_hook(lambda m, args, index=index: inputs.setdefault(index, args[0]))
    reduce = UccMethod.reduce

    def spy(method, state, keep):
        out = reduce(method, state, keep)  # later blocks add to out's running sum in place: keep copies
        ranked_by = state.attention_sum if method.cumulative else state.attention
        cuts.append((ranked_by.clone(), None if out.attention_sum is None else out.attention_sum.clone(), out.size))
        return out

    monkeypatch.setattr(UccMethod, "reduce", spy)
    with torch.inference_mode():
        model(torch.randn(2, 3, 64, 64))
        inherited, size = cuts[0][1], cuts[0][2]

        def row(index, size=None):
            log_size = None if size is None else log_sizes(size, 1, torch.float32)
            return observed_block(model.blocks[index], inputs[index], 1, log_size, want_attention=True)[1]

        if history == "last":
            expected = [row(1), row(4, size)]
        elif history == "cuts":
            expected = [row(1), inherited + row(4, size)]
        else:
            expected = [row(0) + row(1), inherited + row(2, size) + row(3, size) + row(4, size)]
    assert len(cuts) == 2
    for (ranked_by, _, _), want in zip(cuts, expected):
        torch.testing.assert_close(ranked_by, want)


def test_ucc_history_must_be_known():
    with pytest.raises(HwnasError, match="unknown UCC history 'all' \\(known: cuts, blocks, last\\)"):
        UccMethod(history="all")


def test_spectral_energy_is_high_on_edges_and_zero_on_flat_regions():
    flat = torch.ones(1, 16, 3)
    assert torch.allclose(spectral_energy(flat, low_pass_basis(4, 4)), torch.zeros(1, 16), atol=1e-6)  # fp32 rounding of ||x||² = 3
    edge = flat.clone()
    edge[0, 5] = 5.0  # one bright patch in the middle of the grid
    energy = spectral_energy(edge, low_pass_basis(4, 4))[0]
    assert energy.argmax() == 5 and energy[15] < energy[5] / 4


def test_spectral_energy_is_the_high_pass_residual_per_patch():
    torch.manual_seed(0)
    grid = torch.randn(2, 12, 5, dtype=torch.float64)
    basis = low_pass_basis(3, 4).double()
    expected = (grid - basis @ (basis.T @ grid)).pow(2).sum(-1)
    assert torch.allclose(spectral_energy(grid, low_pass_basis(3, 4)).double(), expected, rtol=1e-4)
    with pytest.raises(ValueError, match=r"one token per patch of the grid \(12\), got 7"):
        spectral_energy(grid[:, :7], low_pass_basis(3, 4))


@pytest.mark.parametrize("radius", [LOW_PASS_RADIUS, 0.0, 0.375])
@pytest.mark.parametrize("height, width", [(4, 4), (3, 5), (14, 14)])
def test_low_pass_basis_gives_the_fft_high_pass(height, width, radius):
    grid = torch.randn(2, height, width, 6, dtype=torch.float64)
    fy = torch.fft.fftfreq(height, dtype=torch.float64)[:, None]
    fx = torch.fft.fftfreq(width, dtype=torch.float64)[None, :]
    keep = ((fy ** 2 + fx ** 2).sqrt() > radius).to(torch.float64)[None, :, :, None]
    expected = torch.fft.ifft2(torch.fft.fft2(grid, dim=(1, 2)) * keep, dim=(1, 2)).real
    signal = grid.reshape(2, -1, 6).float()
    basis = low_pass_basis(height, width, radius=radius)
    torch.testing.assert_close(spectral_energy(signal, basis),
                               expected.reshape(2, -1, 6).float().pow(2).sum(-1), atol=1e-4, rtol=1e-4)
    assert torch.allclose(basis.T @ basis, torch.eye(basis.shape[1]), atol=1e-5)  # orthonormal
    actual = signal - basis @ (basis.T @ signal)
    assert torch.allclose(actual, expected.reshape(2, -1, 6).float(), atol=1e-5)


def test_tome_merges_the_most_similar_pairs_and_conserves_size():
    patches = torch.tensor([[[1.0, 0.0], [1.0, 0.01], [0.0, 1.0], [-1.0, 0.2], [0.5, 0.5], [0.2, -1.0]]])
    out = TomeMethod().reduce(_state(patches, keys=patches.clone()), keep=5)
    assert out.patches.shape[1] == 5 and torch.allclose(out.size.sum(), torch.tensor(6.0))
    merged = out.patches[0, out.size[0] == 2]
    assert torch.allclose(merged, (patches[0, 0] + patches[0, 1]) / 2)  # the near-duplicates 0 and 1
    out = TomeMethod().reduce(_state(patches, keys=patches.clone()), keep=2)  # more than one round
    assert out.patches.shape[1] == 2 and torch.allclose(out.size.sum(), torch.tensor(6.0))


def test_evit_fuses_the_inattentive_tokens_into_one():
    patches = torch.arange(8.0).reshape(1, 4, 2)
    attention = torch.tensor([[0.1, 0.6, 0.2, 0.1]])
    out = EvitMethod().reduce(_state(patches, attention=attention), keep=3)
    assert torch.allclose(out.patches[0, :2], patches[0, 1:3])  # the two most attended, in order
    assert torch.allclose(out.patches[0, 2], (patches[0, 0] + patches[0, 3]) / 2)  # equal attention, equal weight


def test_random_is_reproducible():
    """The draw is a function of the shapes: drawn afresh or found cached, the same tokens, in order."""
    patches = torch.arange(2 * 16 * 4, dtype=torch.float32).reshape(2, 16, 4)
    _random_rows.cache_clear()
    first = RandomMethod().reduce(_state(patches), keep=5).patches
    cached = RandomMethod().reduce(_state(patches), keep=5).patches
    _random_rows.cache_clear()
    again = RandomMethod().reduce(_state(patches), keep=5).patches
    assert torch.equal(first, cached) and torch.equal(first, again) and first.shape == (2, 5, 4)
    rows = first[..., 0] / 4 - torch.arange(2)[:, None] * 16  # each kept token's index in its image
    assert all(r.unique().numel() == 5 and torch.equal(r, r.sort().values) for r in rows)
    assert not torch.equal(rows[0], rows[1])  # each image draws its own


def _skip_without_triton_interpreter() -> None:
    """Skip unless the Triton kernels run on CPU tensors (TRITON_INTERPRET=1, as ``make test`` sets)."""
    pytest.importorskip("triton")
    from hwnas.kernels.block_sparse import triton_available

    if not triton_available(torch.device("cpu")):
        pytest.skip("needs TRITON_INTERPRET=1")


def _state_before_a_cut() -> TokenState:
    """Two images of 16 patch tokens (a 4×4 grid) with their keys and class attention: what a cut reads."""
    torch.manual_seed(0)
    patches, keys = torch.randn(2, 16, 8), torch.randn(2, 16, 4)
    attention = torch.rand(2, 16)
    return TokenState(x=torch.cat([torch.zeros(2, 1, 8), patches], 1), prefix=1, low_pass=low_pass_basis(4, 4),
                      attention=attention, attention_sum=attention, keys=keys)


@pytest.mark.parametrize("method", ["ucc", "tome"])
def test_triton_merge_matches_torch(vit, method):
    """The gather + weighted scatter-add kernels (TRITON_INTERPRET=1 on the CPU) give the torch path's tokens."""
    _skip_without_triton_interpreter()
    state = _state_before_a_cut()
    cls = TOKEN_METHODS[method]
    with torch.inference_mode():
        expected = cls(use_triton=False).reduce(state, keep=6)
        actual = cls(use_triton=True).reduce(state, keep=6)
    assert torch.allclose(actual.x, expected.x, atol=1e-5) and torch.allclose(actual.size, expected.size)


@pytest.mark.parametrize("method", list(TOKEN_METHODS))
@pytest.mark.parametrize("use_triton", [False, True])
def test_a_cut_hands_its_methods_kernel_switch_to_every_kernel(monkeypatch, method, use_triton):
    """``use_triton`` reaches every gather, scatter and ranking of a cut (False keeps CUDA tensors on torch)."""
    if use_triton:
        _skip_without_triton_interpreter()
    switches = []
    for name in ("gather_rows", "scatter_add_rows_", "descending_order", "mixed_descending_order"):
        def recorded(*args, kernel=getattr(token_methods, name), **kwargs):
            switches.append(inspect.signature(kernel).bind(*args, **kwargs).arguments.get("use_triton"))
            return kernel(*args, **kwargs)
        monkeypatch.setattr(token_methods, name, recorded)
    with torch.inference_mode():
        TOKEN_METHODS[method](use_triton=use_triton).reduce(_state_before_a_cut(), keep=6)
    assert switches and switches == [use_triton] * len(switches)


@pytest.mark.parametrize("method", list(TOKEN_METHODS))
def test_methods_run_in_half_precision(vit, method):
    """fp16 end to end (the CUDA benchmark's batch-64 point), on the Triton kernels where the interpreter runs them."""
    from hwnas.kernels.block_sparse import triton_available

    use_triton = True if triton_available(torch.device("cpu")) else None
    model = apply_token_keep(copy.deepcopy(vit), {2: 0.5, 5: 0.25}, token_method(method, use_triton=use_triton)).half()
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        out, reference = model(x.half()), apply_token_keep(copy.deepcopy(vit), {2: 0.5, 5: 0.25}, method)(x)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    assert (out.float() - reference).abs().max() < 0.1 * reference.abs().max()


def test_unknown_token_method(vit):
    with pytest.raises(HwnasError, match="unknown token method 'magic'"):
        apply_token_keep(copy.deepcopy(vit), {2: 0.5}, "magic")


@pytest.mark.parametrize("keep, message", [
    ({0: 0.5}, "block 0 has no earlier attention"),
    ({12: 0.5}, "not a block index"),
    ({3: 1.5}, "must be in \\(0, 1\\]"),
])
def test_bad_schedules(vit, keep, message):
    with pytest.raises(HwnasError, match=message):
        apply_token_keep(copy.deepcopy(vit), keep)


def test_rejects_non_vit():
    with pytest.raises(HwnasError, match="needs a timm VisionTransformer"):
        apply_token_keep(torch.nn.Linear(2, 2), {1: 0.5})


def test_ucc_cascade_on_the_kernels_matches_torch(vit):
    """The whole cascade on the kernels (class-attention rows summed in place, ranking, merges) gives torch's logits."""
    from hwnas.kernels.block_sparse import triton_available

    if not triton_available(torch.device("cuda" if torch.cuda.is_available() else "cpu")):
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.randn(3, 3, 64, 64, device=device)
    schedule = {2: 0.5, 4: 0.5, 6: 0.5}
    models = [apply_token_keep(copy.deepcopy(vit), schedule, UccMethod(use_triton=t)).to(device) for t in (True, False)]
    with torch.inference_mode():
        kernels, reference = (model(x) for model in models)
    torch.testing.assert_close(kernels, reference, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_spectral_energy_in_half_precision_on_cuda():
    """On CUDA the residual is taken in the tokens' fp16; the fp32 energy stays close to the fp32 one."""
    patches = torch.randn(4, 196, 384)
    expected = spectral_energy(patches, low_pass_basis(14, 14))
    got = spectral_energy(patches.cuda().half(), low_pass_basis(14, 14).cuda().half())
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.cpu(), expected, rtol=2e-2, atol=1e-2)


def test_ucc_runs_no_more_gpu_operators_than_tome(vit):
    """UCC's bookkeeping (scores, ranking, the sums it carries through fusion) costs no more launches than ToMe's
    bipartite matching: each cut's per-token sums move as one table, its score is mixed inside the ranking kernel."""
    schedule = {3: 0.5, 6: 0.25, 9: 0.125}  # ToMe merges in one round per cut, as on deit_small at −50 % FLOPs
    x = torch.zeros(2, 3, 64, 64)
    launches = {name: len(trace_ops(apply_token_keep(copy.deepcopy(vit), schedule, name), x, one_launch_kernels=True))
                for name in ("ucc", "tome")}
    assert launches["ucc"] <= launches["tome"], launches
