"""The seeds' experiments as code: runs, sweeps, JSONL results and figures."""
