"""The papers' experiments as code (the permuted block-diagonal paper's operator learning,
the DCTpS slides' comparison, structured layers in trained MLPs): runs, sweeps, JSONL
results, tables and figures."""
