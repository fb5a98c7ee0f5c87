"""``memattn bench``: detection and mitigation benchmarks, one command each."""
