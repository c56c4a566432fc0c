"""colora-finetune, the paper's fine-tuning recipe (a tool; `import colora_fused` does not load it).

    recipe.py   the recipe and its command line (`colora-finetune`, `python -m colora_fused.finetune`,
                `torchrun -m colora_fused.finetune`)
    collab.py   the collaborative recipe (`--tasks N`): shared + personal named adapters
    data.py     MedMNIST .npz, ImageFolder and the digits demo; splits and samplers
    metrics.py  accuracy, balanced accuracy, macro F1, AUC; results files
"""
from .recipe import main

__all__ = ["main"]
