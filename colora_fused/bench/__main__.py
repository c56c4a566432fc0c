"""`python -m colora_fused.bench`: colora-bench."""
from .cli import main

main()
