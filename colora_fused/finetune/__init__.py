"""colora-finetune, the paper's fine-tuning recipe (a tool; `import colora_fused` does not load it).

    recipe.py      the recipe's command line and training loop (`colora-finetune`, `python -m
                   colora_fused.finetune`, `torchrun -m colora_fused.finetune`)
    models.py      the backbones with the paper's head, pretrained weights, what each strategy trains
    checkpoint.py  the resumable checkpoint (written, read, checked) and the JSON/CSV outputs
    evaluation.py  predictions on a split (sharded over ranks), loss and accuracy, the test report
    collab.py      the collaborative recipe (`--tasks N`): shared + personal named adapters
    data.py        MedMNIST .npz, ImageFolder and the digits demo; splits, samplers, batches on the device
    metrics.py     accuracy, balanced accuracy, macro F1, AUC; results files
"""
from .recipe import main

__all__ = ["main"]
