"""Small models and random-but-realistic BatchNorm statistics for tests."""
from __future__ import annotations

import torch
from torch import nn


def randomize_bn(model: nn.Module, generator: torch.Generator | None = None) -> nn.Module:
    """Give BatchNorm layers non-trivial running statistics, as a trained model would have."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                m.running_mean.uniform_(-0.5, 0.5, generator=generator)
                m.running_var.uniform_(0.5, 2.0, generator=generator)
                m.weight.uniform_(0.5, 1.5, generator=generator)
                m.bias.uniform_(-0.2, 0.2, generator=generator)
    return model


class ConvBlock(nn.Module):
    def __init__(self, cin: int, cout: int, act: str, residual: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1)
        self.bn = nn.BatchNorm2d(cout)
        self.act = {"relu": nn.ReLU(), "gelu": nn.GELU(), "silu": nn.SiLU(), "none": nn.Identity()}[act]
        self.residual = residual and cin == cout

    def forward(self, x):
        y = self.act(self.bn(self.conv(x)))
        return x + y if self.residual else y


class StackNet(nn.Module):
    """Conv/BN/activation/residual blocks, then pooling and a Linear(+BN1d) head."""

    def __init__(self, in_ch: int, widths: list[int], acts: list[str], residual: list[bool], head_bn: bool,
                 classes: int = 5) -> None:
        super().__init__()
        blocks, cin = [], in_ch
        for w, a, r in zip(widths, acts, residual):
            blocks.append(ConvBlock(cin, w, a, r))
            cin = w
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, classes)
        self.fc_bn = nn.BatchNorm1d(classes) if head_bn else nn.Identity()

    def forward(self, x):
        y = self.blocks(x).mean(dim=(2, 3))
        return self.fc_bn(self.fc(y))


class MLP(nn.Module):
    def __init__(self, sizes: list[int], act: str = "relu") -> None:
        super().__init__()
        layers = []
        for a, b in zip(sizes, sizes[1:]):
            layers += [nn.Linear(a, b), nn.BatchNorm1d(b), nn.ReLU() if act == "relu" else nn.GELU()]
        self.net = nn.Sequential(*layers[:-1])

    def forward(self, x):
        return self.net(x)


class Branchy(nn.Module):
    """Data-dependent Python control flow: the branch depends on the input's values."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:
            return self.a(x)
        return self.b(x) * 10


def run_in_threads(worker, count: int, timeout: float = 120.0) -> list[BaseException]:
    """Run ``worker(i)`` in ``count`` threads at once; return what any of them raised. A thread still running
    after ``timeout`` fails the test (a hang is a failure, not a pass)."""
    import threading

    errors: list[BaseException] = []

    def guarded(i):
        try:
            worker(i)
        except Exception as exc:  # collected for the test to assert on
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    stuck = [t.name for t in threads if t.is_alive()]
    assert not stuck, f"{len(stuck)} of {count} worker threads still running after {timeout:.0f} s: {stuck}"
    return errors


class Cancelling(nn.Module):
    """Two near-equal Linear layers subtracted: bf16 loses most of the difference (eager autocast ~0.28 of the
    output's scale, on any input), which is ordinary bf16 error, not a trace that specialised."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(64, 32), nn.Linear(64, 32)
        with torch.no_grad():
            self.b.weight.copy_(self.a.weight + 1e-3 * torch.randn_like(self.a.weight))
            self.b.bias.copy_(self.a.bias)

    def forward(self, x):
        return self.a(x) - self.b(x)


def assert_exit_waits_for_build(script: str, building_line: str, warning: str) -> None:
    """Run ``script`` in a fresh interpreter (cpuboost cache off) that exits right after starting a background
    build: it must print ``building_line`` (the exit really came while the build ran), log ``warning`` and exit
    with status 0 (a daemon thread killed inside Inductor's compile aborted the process: status 134)."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, CPUBOOST_CACHE_DIR="off")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    assert building_line in done.stdout
    assert warning in done.stderr


def int8_linear(in_features: int, out_features: int, seed: int) -> nn.Module:
    """A seeded weight-only int8 Linear (the decode copy's layer), in eval mode."""
    from cpuboost.generation.weights import Int8Linear

    torch.manual_seed(seed)
    return Int8Linear(nn.Linear(in_features, out_features, bias=False)).eval()


def compiled_with(layer: nn.Module, x: torch.Tensor, options: dict, scopes=()) -> tuple:
    """(output, generated code) of ``layer(x)`` compiled fresh under Inductor ``options`` inside ``scopes`` (context
    managers: the GEMM micro-kernels a test registers)."""
    import contextlib

    import torch._inductor.config as inductor_config
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    with torch.no_grad(), inductor_config.patch(options), contextlib.ExitStack() as stack:
        for scope in scopes:
            stack.enter_context(scope)
        out, code = run_and_get_code(torch.compile(layer, dynamic=False), x)
    torch._dynamo.reset()
    return out, "\n".join(code)
