"""The training recipe tests/test_cuda.py's fp16 and bf16 tests judge the GPU by, run on the CPU: where it does not
learn in fp32 here, a failure on the GPU says nothing about CUDA."""
import pytest
import torch
from test_cuda import LEARNS, assert_learns, digits_batches, snnet, train_epochs

CPU = torch.device("cpu")


@pytest.mark.parametrize("amp_dtype", [None, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.slow
def test_the_cuda_tests_recipe_learns_on_the_cpu(digits_images, amp_dtype):
    losses, _ = train_epochs(snnet(), digits_batches(digits_images, n=LEARNS["n"]), amp_dtype, cfg_id=2,
                             lr=LEARNS["lr"], device=CPU)
    assert_learns(losses)
