"""Two-level distillation: the loss is zero only when the student matches the teacher; class tokens line up."""

import copy

import pytest
import timm
import torch

from hwnas.errors import HwnasError
from hwnas.export.finetune import ClassTokens, distillation_loss, finetune_export
from hwnas.kernels.block_sparse import BlockSparseLinear
from hwnas.pruning.block_layers import forced_impl
from hwnas.pruning.token_methods import low_pass_basis
from hwnas.pruning.tokens import apply_token_keep


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, num_classes=10).eval()


def test_loss_is_zero_for_a_perfect_student_and_positive_otherwise():
    logits, tokens = torch.randn(4, 10), [torch.randn(4, 8) for _ in range(3)]
    assert distillation_loss(logits, logits, tokens, tokens, None).abs() < 1e-6
    assert distillation_loss(logits + torch.randn(4, 10), logits, tokens, tokens, None) > 0.01
    assert distillation_loss(logits, logits, [t + 1 for t in tokens], tokens, None) > 0.01


def test_class_tokens_line_up_between_a_pruned_student_and_its_teacher(vit):
    student = apply_token_keep(copy.deepcopy(vit), {2: 0.5, 4: 0.25}, "ucc")
    student_tokens, teacher_tokens = ClassTokens(student), ClassTokens(vit)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        student(x), vit(x)
    got, expected = student_tokens.take(), teacher_tokens.take()
    assert len(got) == len(expected) == len(vit.blocks)
    assert torch.allclose(got[0], expected[0], atol=1e-5)  # nothing is cut before block 2
    assert not torch.allclose(got[-1], expected[-1], atol=1e-3)


def test_gradients_flow_through_the_pruned_blocks(vit):
    student = apply_token_keep(copy.deepcopy(vit), {2: 0.5, 4: 0.25}, "ucc")
    low_pass_basis.cache_clear()
    with torch.inference_mode():  # an evaluation first (as search does) must not poison cached tensors
        student(torch.randn(2, 3, 32, 32))
    student.train()(torch.randn(2, 3, 32, 32)).sum().backward()
    assert student.blocks[5].mlp.fc1.weight.grad is not None and student.blocks[5].mlp.fc1.weight.grad.abs().sum() > 0


def test_gradients_pass_block_sparse_layers_on_any_calibrated_path():
    torch.manual_seed(0)
    first = torch.nn.Linear(32, 32)
    mask = torch.tensor([[True, False], [False, True]])
    sparse = BlockSparseLinear.from_linear(torch.nn.Linear(32, 32), mask, block=16)
    sparse.impl["cpu"] = "torch_bsr"  # what calibration may pick: no backward
    model = torch.nn.Sequential(first, sparse)
    with forced_impl(model, "dense"):  # what finetune_export trains with
        model(torch.randn(3, 32)).sum().backward()
    assert first.weight.grad is not None and first.weight.grad.abs().sum() > 0
    assert sparse.impl["cpu"] == "torch_bsr"


def test_finetune_refuses_what_is_not_an_export(tmp_path):
    with pytest.raises(HwnasError, match="not an hwnas export"):
        finetune_export(tmp_path, tmp_path / "out")
