"""The PEFT-style examples of docs/api.md, as written there (HF Trainer, config round trip, MergeSchedule loop), each
followed by checks of what it should have done. The Lightning example is covered by test_callbacks."""
import pytest
from torch import nn


def test_hf_trainer_example(tmp_path, monkeypatch, capsys):
    pytest.importorskip("transformers")
    monkeypatch.chdir(tmp_path)

    import torch, torchvision, transformers  # noqa: E401
    import colora_fused as cf

    model = cf.get_colora_model(torchvision.models.resnet18(weights=None, num_classes=10),  # your pretrained backbone
                                cf.CoLoRAConfig(target_modules=lambda n, m: m.kernel_size != (1, 1), modules_to_save=["fc"]))  # noqa: E501 (verbatim from docs/api.md)
    cf.print_trainable_parameters(model)
    data = [{"x": torch.randn(3, 32, 32), "labels": i % 10} for i in range(16)]  # forward(x) and the labels
    args = transformers.TrainingArguments("colora-out", num_train_epochs=2, per_device_train_batch_size=8,
                                          label_names=["labels"], report_to=[])
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[cf.CoLoRATrainerCallback()],
                                   compute_loss_func=lambda out, labels, **_: torch.nn.functional.cross_entropy(out, labels))  # noqa: E501 (verbatim from docs/api.md)
    trainer.train()  # merges the adapters into the frozen weights after every epoch
    model = cf.merge_and_unload(model)  # a plain resnet18 again, the training folded into its weights

    # resnet18's k×k convs: conv1 (7×7) and the 16 3×3 convs; fc (512·10 + 10) kept trainable.
    assert capsys.readouterr().out.startswith("trainable params: 1,263,626 || all params: 12,440,138 ||")
    assert trainer.state.global_step == 4
    (callback,) = [c for c in trainer.callback_handler.callbacks if isinstance(c, cf.CoLoRATrainerCallback)]
    assert callback.schedule.merges == [(1, 2), (2, 4)]
    assert not cf.colora_layers(model) and type(model.layer1[0].conv1) is nn.Conv2d
    fresh = torchvision.models.resnet18(weights=None, num_classes=10)
    assert set(model.state_dict()) == set(fresh.state_dict()), "a plain resnet18 checkpoint again"


def test_config_example():
    import json
    import colora_fused as cf

    config = cf.CoLoRAConfig(target_modules=r"^layer[34]\.", exclude_modules=["layer4.0.downsample.0"],
                             modules_to_save=["fc"], order="pointwise_first", train_bias=True, backend="auto")
    text = json.dumps(config.to_dict())
    assert cf.CoLoRAConfig.from_dict(json.loads(text)) == config


def test_merge_schedule_example(capsys):
    import torch, torchvision  # noqa: E401
    import colora_fused as cf

    model = cf.get_colora_model(torchvision.models.resnet18(weights=None, num_classes=10),
                                cf.CoLoRAConfig(modules_to_save=["fc"]))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    schedule = cf.MergeSchedule(model, optimizer, every=1, unit="epoch")  # or unit="step"
    batches = [(torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))) for _ in range(2)]
    for epoch in range(2):
        for x, y in batches:
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
            schedule.step()  # counts optimizer steps; merges here when unit="step"
        schedule.epoch_end()  # merges K0 ← K0 + ΔK, resets Kp, Kd, Δb and their optimizer state
    print(schedule.merges)  # [(1, 2), (2, 4)]: (epochs, steps) done at each merge

    assert capsys.readouterr().out == "[(1, 2), (2, 4)]\n"
    adapters = [p for _, layer in cf.colora_layers(model) for p in layer.adapter_parameters()]
    assert adapters and not any(p in optimizer.state for p in adapters), "the last merge cleared their state"
    assert all(torch.count_nonzero(layer.depthwise) == 0 for _, layer in cf.colora_layers(model))
    assert model.fc.weight in optimizer.state, "the classifier's optimizer state is kept"
