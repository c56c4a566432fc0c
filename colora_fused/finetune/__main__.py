"""`python -m colora_fused.finetune` (and `torchrun -m colora_fused.finetune`): colora-finetune."""
from .recipe import main

main()
