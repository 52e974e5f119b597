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


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def check_compile(compile) -> None:
    if compile not in (False, True, None) and compile not in COMPILE_MODES:
        raise ValueError(f"compile must be true, false or a torch.compile mode {COMPILE_MODES}, got {compile!r}")


class NetRunner:
    """How a LightningModule runs its network ``self.model``: the memory format (``hparams.channels_last``) and
    ``torch.compile`` (``hparams.compile``: true or a mode name, e.g. ``reduce-overhead`` for CUDA graphs at small
    batches). ``architecture_changed()`` is what the surgery calls after it changed the widths: new tensors are made
    channels-last again and the network is compiled afresh (a compiled graph is specialised to the old shapes)."""

    def apply_memory_format(self) -> None:
        import torch

        if self.hparams.get("channels_last"):
            self.model.to(memory_format=torch.channels_last)

    def compile_net(self) -> None:
        import torch

        mode = self.hparams.get("compile")
        self.__dict__.pop("_compiled_net", None)  # not a submodule: the state dict keeps the plain keys
        if mode:
            torch._dynamo.reset()  # drop graphs (and guards) of the old architecture
            self.__dict__["_compiled_net"] = torch.compile(self.model, mode=None if mode is True else mode)

    def net(self):
        """The network to call: compiled when ``compile`` is set, else ``self.model``."""
        compiled = self.__dict__.get("_compiled_net")
        return self.model if compiled is None else compiled

    def architecture_changed(self) -> None:
        self.apply_memory_format()
        self.compile_net()
