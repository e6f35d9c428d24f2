"""The reference models on a CUDA GPU: same weights as on the CPU, same outputs within tolerance."""

import pytest
import torch

import walt_export
from runtime.compare import Tolerance, assert_close
from tests.walt_export.test_window_attention import qkv, reference
from walt_export.inputs import denoiser_inputs
from walt_export.window_attention.op import resolve_window, window_attention

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")]

# CUDA vs float64 reference (op) and CUDA vs CPU (models); TF32 is switched off for the float32 rows
OP_TOLERANCES = {torch.float32: Tolerance(1e-5, 1e-5), torch.float16: Tolerance(2e-3, 2e-3),
                 torch.bfloat16: Tolerance(2e-2, 2e-2)}
MODEL_TOLERANCE = Tolerance(1e-4, 1e-4)


@pytest.fixture(autouse=True)
def no_tf32():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.parametrize("dtype", list(OP_TOLERANCES))
@pytest.mark.parametrize("window", [(1, -1, -1), (5, 4, 4)])
def test_op_on_cuda(generator, dtype, window):
    q, k, v = qkv(generator, (5, 8, 8), d=64)
    length = torch.Size(resolve_window(window, (5, 8, 8))).numel()
    bias = torch.randn(2, length, length, generator=generator)
    expected = reference(q, k, v, window, 0.125, bias, heads=2)
    out = window_attention(*(x.cuda().to(dtype) for x in (q, k, v)), window, 0.125, bias.cuda().to(dtype))
    assert out.dtype == dtype and out.is_cuda
    assert_close(out.float().cpu(), expected, OP_TOLERANCES[dtype], f"{dtype} window {window}")


@torch.no_grad()
def test_micro_cascade_on_cuda_matches_cpu(micro, generator):
    gpu = walt_export.build("micro", device="cuda")
    for name, tensor in micro.state_dict().items():  # weights depend on the seed only
        assert torch.equal(gpu.state_dict()[name].cpu(), tensor), name
    for name, stage in micro.denoisers().items():
        args, kwargs = denoiser_inputs(stage.config, generator=generator)
        expected = stage(*args, **kwargs)
        out = getattr(gpu, name)(*(a.cuda() for a in args), **{k: v.cuda() for k, v in kwargs.items()})
        assert_close(out.cpu(), expected, MODEL_TOLERANCE, f"{name} on CUDA")
    latent = torch.randn(1, 8, 3, 16, 16, generator=generator)
    assert_close(gpu.tokenizer.decode(latent.cuda()).cpu(), micro.tokenizer.decode(latent), MODEL_TOLERANCE, "decode")
