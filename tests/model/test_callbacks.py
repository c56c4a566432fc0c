"""MergeSchedule from a hand-written loop, and the HF Trainer and Lightning callbacks in real two-epoch fits:
merges happen on the scheduled steps, leave the model's output unchanged and clear the adapters' optimizer
state (and only theirs)."""
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import colora_fused as cf

N_SAMPLES, BATCH = 12, 4  # three optimizer steps per epoch
STEPS_PER_EPOCH = N_SAMPLES // BATCH


class TinyNet(nn.Module):
    """A conv net taking the HF Trainer's dict batches: forward(pixel_values, labels) -> {"loss", "logits"}."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 8, 3, stride=2, padding=1)
        self.fc = nn.Linear(8, 3)

    def forward(self, pixel_values, labels=None):
        logits = self.fc(F.relu(self.conv2(F.relu(self.conv1(pixel_values)))).mean((2, 3)))
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = F.cross_entropy(logits, labels)
        return out


class TinyImages(torch.utils.data.Dataset):
    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(N_SAMPLES, 3, 8, 8, generator=g)
        self.y = torch.randint(0, 3, (N_SAMPLES,), generator=g)

    def __len__(self):
        return N_SAMPLES

    def __getitem__(self, i):
        return {"pixel_values": self.x[i], "labels": self.y[i]}


def colora_net():
    torch.manual_seed(0)
    return cf.get_colora_model(TinyNet(), cf.CoLoRAConfig(modules_to_save=["fc"]))


PROBE = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(5))


class Observer:
    """Records, around each point where a merge may happen, the output on PROBE, the adapters and which
    parameters have optimizer state; `check` compares the records before and after."""

    def __init__(self, model):
        self.model = model
        self.events = []

    def snapshot(self, optimizer):
        with torch.no_grad():
            out = self.model(PROBE)["logits"].clone()
        kd = [layer.depthwise.detach().clone() for _, layer in cf.colora_layers(self.model)]
        stateful = {id(p) for p, s in optimizer.state.items() if s}
        return out, kd, stateful

    def check(self, before, after, merged, optimizer):
        adapters = {id(p) for _, layer in cf.colora_layers(self.model) for p in layer.adapter_parameters()}
        fc = {id(p) for p in self.model.fc.parameters()}
        (out0, kd0, state0), (out1, kd1, state1) = before, after
        torch.testing.assert_close(out1, out0, atol=1e-5, rtol=1e-5)  # a merge keeps the output
        if merged:
            assert adapters <= state0 and fc <= state0, "Adam held state for every trainable tensor before"
            assert all(torch.count_nonzero(kd) == 0 for kd in kd1), "Kd reset by the merge"
            assert not state1 & adapters, "the adapters' optimizer state is cleared"
            assert fc <= state1, "the classifier's optimizer state is kept"
        else:
            assert all(torch.equal(a, b) for a, b in zip(kd0, kd1)) and state1 == state0


def test_merge_schedule_in_a_plain_loop():
    model = colora_net()
    data = TinyImages()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    by_step = cf.MergeSchedule(model, opt, every=2, unit="step")
    observer = Observer(model)
    merged_at = []
    for epoch in range(2):
        for i in range(0, N_SAMPLES, BATCH):
            opt.zero_grad()
            model(data.x[i:i + BATCH], data.y[i:i + BATCH])["loss"].backward()
            opt.step()
            before = observer.snapshot(opt)
            merged = by_step.step()
            observer.check(before, observer.snapshot(opt), merged, opt)
            merged_at += [by_step.steps] if merged else []
        assert not by_step.epoch_end(), "a step schedule does not merge at the end of an epoch"
    assert merged_at == [2, 4, 6]
    assert by_step.merges == [(0, 2), (1, 4), (1, 6)]  # (finished epochs, steps) at each merge
    restored = cf.MergeSchedule(model, opt, every=2, unit="step")
    restored.load_state_dict(by_step.state_dict())
    assert (restored.steps, restored.epochs, restored.merges) == (6, 2, by_step.merges)


def _train(model, schedule, steps, first=0):
    """Adam steps `first`..`steps - 1` on TinyImages, each followed by `schedule.step()` (which gets the optimizer)."""
    data = TinyImages()
    schedule.optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for k in range(first, steps):
        i = k % STEPS_PER_EPOCH * BATCH
        schedule.optimizer.zero_grad()
        model(data.x[i:i + BATCH], data.y[i:i + BATCH])["loss"].backward()
        schedule.optimizer.step()
        schedule.step()


def test_seeded_merges_draw_reproducible_kp_and_leave_the_global_rng_alone():
    """Each merge of a seeded schedule draws Kp from its seed and merge number: a run resumed from the schedule's
    state draws what the uninterrupted run drew, whatever the global generator did meanwhile."""
    def seeded(model, seed=3):
        return cf.MergeSchedule(model, every=2, unit="step", seed=seed)

    def kp(model):
        return [layer.pointwise for _, layer in cf.colora_layers(model)]

    straight = colora_net()
    torch.manual_seed(11)
    _train(straight, seeded(straight), 6)
    after = torch.rand(1)
    torch.manual_seed(11)
    assert torch.equal(torch.rand(1), after), "the merges drew from forked generators: the global stream is intact"

    model = colora_net()
    first = seeded(model)
    _train(model, first, 4)
    resumed = seeded(model)
    resumed.load_state_dict(first.state_dict())
    torch.manual_seed(12345)  # another global stream: the third merge's Kp does not depend on it
    _train(model, resumed, 6, first=4)
    assert resumed.merges == [(0, 2), (0, 4), (0, 6)]
    assert all(map(torch.equal, kp(model), kp(straight))), "the third merge drew the same Kp"

    other = colora_net()
    _train(other, seeded(other, seed=4), 6)
    assert not all(map(torch.equal, kp(other), kp(straight))), "another seed, other draws"
    with pytest.raises(ValueError, match="seed"):
        cf.MergeSchedule(colora_net(), seed=1.5)


@pytest.mark.parametrize("name, package", [("CoLoRATrainerCallback", "transformers"),
                                           ("CoLoRALightningCallback", "lightning")])
def test_callback_without_its_framework_is_a_clear_import_error(monkeypatch, name, package):
    monkeypatch.setattr(cf.callbacks, "_BUILT", {})
    for module in [m for m in sys.modules if m == package or m.startswith(package + ".")]:
        monkeypatch.delitem(sys.modules, module)
    monkeypatch.setitem(sys.modules, package, None)  # makes `import package` fail, as when it is not installed
    with pytest.raises(ImportError, match=f"colora_fused.{name} needs {package} \\(pip install {package}\\)"):
        getattr(cf, name)
    assert cf.MergeSchedule is cf.callbacks.MergeSchedule, "the rest of the package works without it"


def test_merge_schedule_refuses_bad_arguments():
    model = colora_net()
    with pytest.raises(ValueError, match="unit"):
        cf.MergeSchedule(model, unit="batch")
    with pytest.raises(ValueError, match="every"):
        cf.MergeSchedule(model, every=0)
    with pytest.raises(ValueError, match="no CoLoRA layer"):
        cf.MergeSchedule(TinyNet())
    schedule = cf.MergeSchedule(model, torch.optim.SGD(model.fc.parameters(), lr=0.1), unit="step")
    with pytest.raises(ValueError, match="does not hold"):
        schedule.step()


@pytest.mark.parametrize("every, unit, expected", [(1, "epoch", [3, 6]), (2, "step", [2, 4, 6])],
                         ids=["every-epoch", "every-2-steps"])
def test_hf_trainer_callback(tmp_path, every, unit, expected):
    transformers = pytest.importorskip("transformers")

    model = colora_net()
    observer = Observer(model)
    records = {}

    class Before(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, optimizer=None, **kwargs):
            records[("step", state.global_step)] = observer.snapshot(optimizer)

        def on_epoch_end(self, args, state, control, optimizer=None, **kwargs):
            records[("epoch", state.global_step)] = observer.snapshot(optimizer)

    class After(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, optimizer=None, **kwargs):
            observer.check(records[("step", state.global_step)], observer.snapshot(optimizer),
                           unit == "step" and state.global_step % every == 0, optimizer)

        def on_epoch_end(self, args, state, control, optimizer=None, **kwargs):
            observer.check(records[("epoch", state.global_step)], observer.snapshot(optimizer), unit == "epoch",
                           optimizer)

    colora = cf.CoLoRATrainerCallback(every=every, unit=unit)
    # The default optimizer (adamw_torch_fused in recent transformers) writes parameters without bumping their
    # versions: the merged-weight cache must still see every step, or the output checks around a merge fail.
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), num_train_epochs=2, per_device_train_batch_size=BATCH, learning_rate=1e-2,
        lr_scheduler_type="constant", save_strategy="no", logging_strategy="no", report_to=[],
        use_cpu=True, disable_tqdm=True, dataloader_num_workers=0, seed=0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=TinyImages(),
                                   callbacks=[Before(), colora, After()])
    trainer.train()
    assert trainer.state.global_step == 2 * STEPS_PER_EPOCH
    assert [step for _, step in colora.schedule.merges] == expected


@pytest.mark.parametrize("every, unit, accumulate, expected", [
    (1, "epoch", 1, [(1, 3), (2, 6)]),
    # 3 batches an epoch, 2 accumulated per optimizer step: steps end at batches 2 and 3 (the epoch's rest).
    (1, "step", 2, [(0, 1), (0, 2), (1, 3), (1, 4)]),
], ids=["every-epoch", "every-step-accumulating-2"])
def test_lightning_callback(tmp_path, every, unit, accumulate, expected):
    pl = pytest.importorskip("lightning.pytorch")

    net = colora_net()
    records = {}

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, pixel_values):
            return self.net(pixel_values)

        def training_step(self, batch, batch_idx):
            return self.net(batch["pixel_values"], batch["labels"])["loss"]

        def configure_optimizers(self):
            return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-2)

    observer = Observer(net)

    class Before(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            records["batch"] = observer.snapshot(trainer.optimizers[0])

        def on_train_epoch_end(self, trainer, pl_module):
            records["epoch"] = observer.snapshot(trainer.optimizers[0])

    class After(pl.Callback):
        last_step = 0

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            stepped, self.last_step = trainer.global_step != self.last_step, trainer.global_step
            observer.check(records["batch"], observer.snapshot(trainer.optimizers[0]), unit == "step" and stepped,
                           trainer.optimizers[0])

        def on_train_epoch_end(self, trainer, pl_module):
            observer.check(records["epoch"], observer.snapshot(trainer.optimizers[0]), unit == "epoch",
                           trainer.optimizers[0])

    colora = cf.CoLoRALightningCallback(every=every, unit=unit)
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
                         accumulate_grad_batches=accumulate, callbacks=[Before(), colora, After()])
    loader = torch.utils.data.DataLoader(TinyImages(), batch_size=BATCH)
    trainer.fit(Module(), loader)
    assert colora.schedule.merges == expected
    assert trainer.global_step == expected[-1][1]
