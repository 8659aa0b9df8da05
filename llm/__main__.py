"""`python -m llm ...` is `llm ...` (what torchrun and the deepspeed launcher run)."""
import sys

from llm.cli import main

sys.exit(main())
