"""`python -m ray_broker.verification HISTORY.jsonl [--json]`: check a saved history; exit 1 if invalid."""
from .checker import main

raise SystemExit(main())
