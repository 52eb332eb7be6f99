"""CLIPFineTuner's GPU step options on CPU: activation checkpointing and micro-batches change memory, not the step
(the same loss, gradients and AdamW update within float tolerance), bad settings fail in one line, and `compile`
reaches torch.compile for both towers."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.plugins.precision import Precision

from timelit.training.model import CLIPFineTuner

MICRO = "timelit-micro-ViT"
BATCH = 12


def batch_for(module: CLIPFineTuner) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    size = module.model.visual.image_size
    context = module.model.context_length
    return {
        "image": torch.randn(BATCH, 3, *size, generator=generator),
        "text": torch.randint(1, module.model.vocab_size, (BATCH, context), generator=generator),
    }


def with_trainer(module: CLIPFineTuner, accumulate: int = 1, batch_size: int = BATCH, world: int = 1):
    datamodule = SimpleNamespace(  # what timelit.training.contracts.TrainingBatches promises
        batch_size=batch_size, steps_per_task=10, require_steps=lambda: 10, set_steps_per_task=lambda steps: None
    )
    module.trainer = SimpleNamespace(  # type: ignore[assignment]
        precision_plugin=Precision(), datamodule=datamodule, global_rank=0, world_size=world,
        accumulate_grad_batches=accumulate,
    )  # fmt: skip
    return module


def step(module: CLIPFineTuner, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss and gradients of one training step (the loss over the whole batch, as in training)."""
    module.setup("fit")
    module.model.zero_grad()
    loss = module.training_step(batch, 0)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in module.model.named_parameters() if p.grad is not None}


def twin(reference: CLIPFineTuner, **options) -> CLIPFineTuner:
    module = with_trainer(CLIPFineTuner(model_name=MICRO, pretrained=None, **options))
    module.model.load_state_dict(reference.model.state_dict())
    return module


@pytest.fixture(autouse=True)
def no_logging(monkeypatch):
    monkeypatch.setattr("timelit.training.model.reaches_logger", lambda trainer: False)


@pytest.fixture
def reference() -> CLIPFineTuner:
    torch.manual_seed(0)
    return with_trainer(CLIPFineTuner(model_name=MICRO, pretrained=None))


def assert_same_step(a, b, rtol=1e-4, atol=1e-6):
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    assert grads_a.keys() == grads_b.keys()
    torch.testing.assert_close(loss_a, loss_b, rtol=rtol, atol=atol)
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=rtol, atol=atol, msg=name)


def test_activation_checkpointing_gives_the_same_loss_and_gradients(reference):
    checkpointed = twin(reference, grad_checkpointing=True)
    assert checkpointed.model.visual.transformer.grad_checkpointing
    assert checkpointed.model.transformer.grad_checkpointing
    batch = batch_for(reference)
    assert_same_step(step(reference, batch), step(checkpointed, batch))


@pytest.mark.parametrize("k", [2, 3, 12])
def test_micro_batches_give_the_same_loss_gradients_and_update(reference, k):
    micro = twin(reference, micro_batches=k)
    batch = batch_for(reference)
    whole = step(reference, batch)
    assert len(whole[1]) == len(list(reference.model.parameters()))
    assert_same_step(whole, step(micro, batch))
    # One AdamW step from fresh moments moves the weights the same way. Adam's first step is lr * g / (|g| + eps):
    # where the exact gradient is zero (the attention's key bias: softmax ignores it) float noise of 1e-10 becomes
    # a step of +-lr, so those entries are left out; everywhere else the step agrees to float tolerance.
    gradient = whole[1]
    steps = []
    for module in (reference, micro):
        before = copy.deepcopy(module.model.state_dict())
        configured = module.configure_optimizers()  # the schedule holds a weak reference to the optimizer
        configured["optimizer"].step()
        steps.append({n: p.detach() - before[n] for n, p in module.model.named_parameters()})
    compared = 0
    for name, grad in gradient.items():
        real = grad.abs() > 1e-6
        compared += int(real.sum())
        torch.testing.assert_close(steps[0][name][real], steps[1][name][real], rtol=1e-3, atol=1e-9, msg=name)
    assert compared > 0.5 * sum(g.numel() for n, g in gradient.items() if n != "token_embedding.weight")


def test_micro_batches_and_checkpointing_together(reference):
    both = twin(reference, micro_batches=4, grad_checkpointing=True)
    batch = batch_for(reference)
    assert_same_step(step(reference, batch), step(both, batch))


@pytest.mark.parametrize("bad", [0, -2, True, 1.5])
def test_micro_batches_must_be_a_positive_integer(bad):
    with pytest.raises(ValueError, match=r"model.micro_batches must be a positive integer"):
        CLIPFineTuner(model_name=MICRO, pretrained=None, micro_batches=bad)


def test_micro_batches_must_divide_each_ranks_batch():
    module = with_trainer(CLIPFineTuner(model_name=MICRO, pretrained=None, micro_batches=5), batch_size=512, world=2)
    with pytest.raises(ValueError, match=r"micro_batches=5 does not divide each rank's batch of 256 \(data.batch_size"):
        module.setup("fit")
    with_trainer(module, batch_size=520, world=2).setup("fit")  # 260 = 5 x 52


def test_lightnings_accumulation_is_refused_with_the_option_to_use():
    module = with_trainer(CLIPFineTuner(model_name=MICRO, pretrained=None), accumulate=4)
    with pytest.raises(ValueError, match=r"accumulate_grad_batches=4 is not supported.*model.micro_batches"):
        module.setup("fit")


def test_compile_reaches_torch_compile_for_both_towers(monkeypatch):
    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *a, **k: compiled.append(self))
    module = CLIPFineTuner(model_name=MICRO, pretrained=None, compile=True)
    assert compiled == [module.model.visual, module.model.transformer]
    CLIPFineTuner(model_name=MICRO, pretrained=None)
    assert len(compiled) == 2  # off by default
