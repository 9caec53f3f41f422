"""The task interface on the bundled digits task (the reference implementation of ClassificationTask)."""

from __future__ import annotations

import pytest
import torch

from flatminima.bench.tasks import TASKS, DigitsTask, Task, register_task


def test_digits_task_trains_and_evaluates_with_a_clean_validation_split():
    task = TASKS["digits-mlp"](size="quick", data_seed=0)
    torch.manual_seed(0)
    model = task.make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for epoch in range(5):
        for batch in task.train_batches(torch.Generator().manual_seed(epoch)):
            opt.zero_grad()
            task.loss(model, batch).backward()
            opt.step()
    model.train()
    val, test = task.evaluate(model, "val"), task.evaluate(model, "test")
    assert model.training  # evaluate restores the mode
    assert val["accuracy"] > 0.9 and test["accuracy"] > 0.9
    assert task.steps_per_epoch() == -(-task.x_train.shape[0] // 64)


def test_label_noise_touches_training_labels_only_and_per_sample_losses_agree():
    clean, noisy = DigitsTask(size="tiny"), DigitsTask(size="tiny", label_noise=0.2)
    assert int(noisy.flipped.sum()) == round(0.2 * 256)
    assert torch.equal(noisy.y_train_clean, clean.y_train) and not torch.equal(noisy.y_train, clean.y_train)
    assert torch.equal(noisy.y_val, clean.y_val) and torch.equal(noisy.y_test, clean.y_test)
    torch.manual_seed(0)
    model = noisy.make_model()
    batch = next(noisy.train_batches(torch.Generator().manual_seed(0)))
    with torch.no_grad():
        per = noisy.sample_losses(model, batch)
        assert per.shape == (64,)
        assert float(per.mean()) == pytest.approx(float(noisy.loss(model, batch)), rel=1e-6)
        rows = torch.tensor([3, 7, 11])
        sub = noisy.select(batch, rows)
        torch.testing.assert_close(noisy.sample_losses(model, sub), per[rows], rtol=1e-6, atol=1e-7)


def test_bad_arguments_and_duplicate_registration():
    with pytest.raises(ValueError, match="size: 'huge'"):
        DigitsTask(size="huge")
    with pytest.raises(ValueError, match="label_noise: 1.0"):
        DigitsTask(label_noise=1.0)
    with pytest.raises(ValueError, match="invalid split"):
        DigitsTask(size="tiny").evaluate(DigitsTask(size="tiny").make_model(), "holdout")

    class Other(Task):
        name = "digits-mlp"

    with pytest.raises(ValueError, match="already registered"):
        register_task(Other)
