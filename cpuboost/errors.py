"""Typed errors: one root, each subclass also the nearest builtin so ``except ValueError`` works."""


class CpuBoostError(Exception):
    """Root of every error cpuboost raises on purpose."""


class UnknownDtypeError(CpuBoostError, ValueError):
    """A dtype name or object cpuboost does not handle."""


class UnknownOptionError(CpuBoostError, TypeError):
    """An option name that does not exist (usually a typo)."""


class InvalidOptionError(CpuBoostError, ValueError):
    """An option whose value is outside its valid choices."""


class BackendUnavailableError(CpuBoostError, RuntimeError):
    """An explicitly requested backend cannot run here."""


class UnsupportedTargetError(CpuBoostError, TypeError):
    """Something that is not a module, a (module, optimizer) pair, a class or a function."""


class OptimizerMismatchError(CpuBoostError, ValueError):
    """An optimizer that does not own the model's parameters, or several optimizers."""


class PassRegistrationError(CpuBoostError, ValueError):
    """A pass registered twice, with bad ordering, or looked up under an unknown name."""


class PassFailedError(CpuBoostError, RuntimeError):
    """A pass raised; names the pass and those that ran before it."""


class ModelModeError(CpuBoostError, ValueError):
    """A model whose train/eval mode contradicts the request (an eval-mode model handed over with an optimizer)."""


class CalibrationError(CpuBoostError, ValueError):
    """int8 calibration data that is empty, not a list of inputs, or shaped unlike the example input."""


class NotQuantizableError(CpuBoostError, ValueError):
    """A model int8 cannot work on: no Linear/Conv layer, or (without calibration data) no Linear layer."""


class QuantizationError(CpuBoostError, RuntimeError):
    """Quantizing or compiling the private int8 copy failed; the user's model is untouched."""
