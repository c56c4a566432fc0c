"""colora-audit, the static kernel audit (a tool; `import colora_fused` does not load it).

    core.py   records each kernel family's launches, compiles them for sm_90 / sm_80 and reads what the compiler
              made; the estimate, the reports and the command line (`colora-audit`, `python -m colora_fused.audit`)
"""
from .core import main

__all__ = ["main"]
