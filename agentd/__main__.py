"""`python -m agentd` entry point."""

from __future__ import annotations

from agentd.cli import main

if __name__ == "__main__":
    main()
