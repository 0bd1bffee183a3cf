"""torch.compile of a torch.export program as `kiln build sd|vit --torch-compile` serve it (torch_session).

On a GPU the compiled program is what each CUDA graph bucket captures; no GPU here, so this checks on the CPU what
the session relies on: the program's module compiles, computes what it computes uncompiled, and one compile serves
every row count once the first call's rows are marked symbolic (rows_symbolic), where otherwise the second count
compiles again. The GPU half (the capture) runs in the GPU check's unet_compiled phase.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")


class _Step(torch.nn.Module):
    """A denoising step's shape in small: a convolution on latents, a per-row timestep."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 8, 3, padding=1)
        self.out = torch.nn.Conv2d(8, 4, 1)

    def forward(self, sample, timestep):
        return self.out(torch.nn.functional.silu(self.conv(sample) + timestep[:, None, None, None]))


def _compiles(marked: bool) -> tuple[int, float]:
    """How many graphs torch.compile made for calls at 2, 4, 8 and 3 rows, and the largest difference from the
    program uncompiled."""
    from torch._dynamo.utils import counters

    from kiln.runtime.torch_session import rows_symbolic

    torch.manual_seed(0)
    rows = torch.export.Dim("rows", min=1, max=64)
    program = torch.export.export(_Step().eval(), (torch.randn(2, 4, 8, 8), torch.randn(2)),
                                  dynamic_shapes=({0: rows}, {0: rows})).module()
    torch._dynamo.reset()
    counters.clear()
    compiled, worst = torch.compile(program), 0.0
    for n in (2, 4, 8, 3):
        inputs = (torch.randn(n, 4, 8, 8), torch.randn(n))
        if marked and n == 2:
            rows_symbolic(inputs)
        with torch.inference_mode():
            worst = max(worst, float((compiled(*inputs) - program(*inputs)).abs().max()))
    return counters["stats"]["unique_graphs"], worst


def test_one_compile_serves_every_row_count_once_the_rows_are_symbolic():
    graphs, worst = _compiles(marked=True)
    assert graphs == 1 and worst < 1e-5
    assert _compiles(marked=False)[0] == 2  # unmarked: 4 rows compiled again (then torch made the rows dynamic)


class _Classify(torch.nn.Module):
    """A ViT call's shape in small: images to patches, a token mix, and a per-row `layer` input (n, 1)."""

    def __init__(self) -> None:
        super().__init__()
        self.patches = torch.nn.Conv2d(3, 6, 4, stride=4)
        self.head = torch.nn.Linear(6, 5)

    def forward(self, pixel_values, layer):
        tokens = self.patches(pixel_values).flatten(2).transpose(1, 2)
        return self.head(tokens).mean(1) + layer.to(tokens.dtype)


def test_the_vits_buckets_take_two_compiles():
    """`vit`'s CUDA graphs at 1, 8, 64 and 256 images (kiln build vit --torch-compile): torch specializes a batch of
    1, so the first bucket compiles alone and the next one compiles the symbolic graph that serves the rest (and any
    other row count)."""
    from torch._dynamo.utils import counters

    from kiln.runtime.torch_session import rows_symbolic

    torch.manual_seed(0)
    rows = torch.export.Dim("rows", min=1, max=256)
    inputs = (torch.randn(2, 3, 16, 16), torch.zeros(2, 1, dtype=torch.int64))
    program = torch.export.export(_Classify().eval(), inputs, dynamic_shapes=({0: rows}, {0: rows})).module()
    torch._dynamo.reset()
    counters.clear()
    compiled, graphs = torch.compile(program), []
    for index, n in enumerate((1, 8, 64, 256, 3)):
        call = (torch.randn(n, 3, 16, 16), torch.randint(0, 4, (n, 1)))
        if index == 0:  # as TorchSession._capture marks its first bucket
            rows_symbolic(call)
        with torch.inference_mode():
            assert float((compiled(*call) - program(*call)).abs().max()) < 1e-5
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs == [1, 2, 2, 2, 2]
