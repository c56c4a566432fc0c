"""`python -m colora_fused.audit`: colora-audit."""
from .core import main

main()
