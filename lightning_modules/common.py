"""What the LightningModules share: the non-finite-loss error and the validation / test hooks."""

from __future__ import annotations


class NonFiniteLossError(FloatingPointError):
    """Raised when the training loss becomes NaN or Inf."""


class EvalHooks:
    """Lightning's validation and test hooks, routed to the module's ``_eval_step(batch, stage)`` and
    ``_eval_epoch_end(stage)`` (stage ``"val"`` or ``"test"``)."""

    def validation_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")
